"""rlkernels against Liger-Kernel on a GPU, where liger_kernel is installed.

The comparable pair: per-token log-probs from `hidden @ lm_head` without full logits
(`rlkernels.linear_logprobs`) and Liger's fused linear cross-entropy with
reduction="none" (its loss is minus the log-prob).  Forward + backward time (median of
CUDA-event timings after warm-up) and peak extra memory, both in the same process, and
the largest difference between the two results.  Also the whole-row pair from logits:
`rlkernels.logprobs` and Liger's cross-entropy.

    python .ci/gpu_liger.py [--tokens 8192] [--hidden 4096] [--vocab 151936] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def timed(fn, repeats=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--json")
    args = p.parse_args(argv)
    for name in ("tokens", "hidden", "vocab"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    if not torch.cuda.is_available():
        print("gpu_liger: no GPU is visible", file=sys.stderr)
        return 2
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        print(f"gpu_liger: liger_kernel is not importable ({exc})", file=sys.stderr)
        return 2
    import rlkernels

    dtype = getattr(torch, args.dtype)
    dev = "cuda"
    torch.manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, device=dev) / 2).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=dev) / args.hidden ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    liger_linear = LigerFusedLinearCrossEntropyLoss(reduction="none")
    results = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "tokens": args.tokens,
               "hidden": args.hidden, "vocab": args.vocab, "cases": []}

    def linear_ours():
        lp = rlkernels.linear_logprobs(hidden, weight, labels)
        lp.sum().backward()
        return lp

    def linear_liger():
        loss = liger_linear(weight, hidden, labels)
        (-loss).sum().backward()
        return -loss

    diff = (linear_ours().detach().float() - linear_liger().detach().float()).abs().max().item()
    hidden.grad = weight.grad = None
    results["cases"].append(_pair("linear log-probs fwd+bwd", linear_ours, linear_liger, diff, (hidden, weight)))

    n = min(args.tokens, 4096)
    logits = (torch.randn(n, args.vocab, device=dev) * 2).to(dtype).requires_grad_()
    liger_ce = LigerCrossEntropyLoss(reduction="none")

    def rows_ours():
        lp = rlkernels.logprobs(logits, labels[:n])
        lp.sum().backward()
        return lp

    def rows_liger():
        loss = liger_ce(logits, labels[:n])
        (-loss).sum().backward()
        return -loss

    diff = (rows_ours().detach().float() - rows_liger().detach().float()).abs().max().item()
    logits.grad = None
    results["cases"].append(_pair("log-probs from logits fwd+bwd", rows_ours, rows_liger, diff, (logits,)))
    for c in results["cases"]:
        print(f"{c['case']:32s} rlkernels {c['ours_ms']:8.2f} ms  liger {c['liger_ms']:8.2f} ms  "
              f"speed-up {c['speedup']:.2f}x  peak extra {c['ours_peak_mib']:.0f} / {c['liger_peak_mib']:.0f} MiB  "
              f"max |diff| {c['max_abs_diff']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _pair(name, ours, liger, diff, params):
    def clear():
        for t in params:
            t.grad = None

    def run(fn):
        clear()
        return fn()

    ours_ms, liger_ms = timed(lambda: run(ours)), timed(lambda: run(liger))
    ours_peak, liger_peak = peak_extra(lambda: run(ours)), peak_extra(lambda: run(liger))
    clear()
    return {"case": name, "ours_ms": ours_ms, "liger_ms": liger_ms, "speedup": liger_ms / ours_ms,
            "ours_peak_mib": ours_peak / 2**20, "liger_peak_mib": liger_peak / 2**20, "max_abs_diff": diff}


if __name__ == "__main__":
    sys.exit(main())
