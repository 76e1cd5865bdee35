"""Ops on a busy machine (`rlkernels bench --ops busy`): time on all threads against
time on one thread, under the same load.

The family starts one spinning process per core itself (each bounded: it exits on
its own after a deadline, and is killed when the family ends), then times every
case alternately with torch.set_num_threads(1) and with all threads.  A parallel
region that waits for a thread the OS has not scheduled shows up as "all threads"
far slower than "one thread"; the goal is at most 1.5x.
PyTorch's own softmax and log_softmax+gather run beside ours as the yardstick.

Run alone: python -m rlkernels.benchmarks.busy [--quick]"""
from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterator

import torch

import rlkernels

from .harness import timed_rows

GOAL_RATIO = 1.5
_SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_cores(count: int, seconds: float) -> Iterator[list[subprocess.Popen]]:
    """`count` processes that spin for at most `seconds` (they stop by themselves
    should this process die) and are killed on exit from the block."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(seconds=seconds)]) for _ in range(count)]
    try:
        time.sleep(0.2)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _cases(quick: bool) -> list[tuple[str, dict, Callable[[], object]]]:
    g = torch.Generator().manual_seed(0)
    B, T = (64, 512) if quick else (256, 1024)
    N, V = (64, 8192) if quick else (512, 32000)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.1
    lp = torch.randn(B, T, generator=g).requires_grad_(True)
    old, adv = lp.detach() + 0.05 * torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    logits = torch.randn(N, V, generator=g).requires_grad_(True)
    ref_logits = torch.randn(N, V, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    flat = torch.randn(2**20, generator=g)
    # the lm-head ops: their matmuls are torch's (an OpenMP region each, per tile)
    M, H, W = (64, 64, 8192) if quick else (512, 256, 16384)
    hidden = (torch.randn(1, M, H, generator=g) * H ** -0.5).requires_grad_(True)
    weight = torch.randn(W, H, generator=g).requires_grad_(True)
    tokens = torch.randint(0, W, (1, M), generator=g)
    with torch.no_grad():
        rollout = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, tokens[..., None])[..., 0]
    token_adv, token_mask = torch.randn(1, M, generator=g), torch.rand(1, M, generator=g) > 0.1

    def ppo():
        loss, _ = rlkernels.ppo_loss(lp, old, adv, mask)
        return torch.autograd.grad(loss, lp)

    def logprobs():
        return torch.autograd.grad(rlkernels.logprobs(logits, labels).sum(), logits)

    def torch_logprobs():
        out = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).sum()
        return torch.autograd.grad(out, logits)

    def linear_logprobs():
        return torch.autograd.grad(rlkernels.linear_logprobs(hidden, weight, tokens).sum(), (hidden, weight))

    def linear_ppo():
        loss, _ = rlkernels.linear_ppo_loss(hidden, weight, tokens, rollout, token_adv, token_mask)
        return torch.autograd.grad(loss, (hidden, weight))

    def torch_linear_logprobs():
        out = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, tokens[..., None]).sum()
        return torch.autograd.grad(out, (hidden, weight))

    bt, nv, nhv = {"B": B, "T": T}, {"N": N, "V": V}, {"N": M, "H": H, "V": W}
    return [
        ("gae", bt, lambda: rlkernels.gae(r, v, mask, gamma=0.99, lam=0.95)),
        ("discounted_returns", bt, lambda: rlkernels.discounted_returns(r, mask, gamma=0.99)),
        ("masked_whiten", bt, lambda: rlkernels.masked_whiten(r, mask)),
        ("ppo_loss fwd+bwd", bt, ppo),
        ("logprobs fwd+bwd", nv, logprobs),
        ("kl_from_logits fwd", nv, lambda: rlkernels.kl_from_logits(logits.detach(), ref_logits)),
        ("torch log_softmax+gather fwd+bwd", nv, torch_logprobs),
        ("linear_logprobs fwd+bwd", nhv, linear_logprobs),
        ("linear_ppo_loss fwd+bwd", nhv, linear_ppo),
        ("torch hidden@W.T + log_softmax+gather fwd+bwd", nhv, torch_linear_logprobs),
        ("torch softmax", {"numel": flat.numel()}, lambda: torch.softmax(flat, 0)),
    ]


def _time(fn: Callable[[], object], threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(device: str, quick: bool) -> list[dict]:
    if device != "cpu":
        print("busy: CPU threads only; skipped on", device, flush=True)
        return []
    cores = os.cpu_count() or 1
    threads = torch.get_num_threads()
    many = max(threads, 2)
    warmup, repeats = (1, 15) if quick else (2, 11)
    rows = []
    try:
        with busy_cores(cores, seconds=120 if quick else 600):
            for name, params, fn in _cases(quick):
                one, all_ = [], []
                for i in range(warmup + repeats):  # alternate, so the load falls on both alike
                    a, b = _time(fn, 1), _time(fn, many)
                    if i >= warmup:
                        one.append(a)
                        all_.append(b)
                t1, tn = statistics.median(one), statistics.median(all_)
                results = timed_rows([("1 thread", True, t1), (f"{many} threads", False, tn)])
                rows.append({"family": "busy", "name": name,
                             "params": {**params, "busy_processes": cores, "repeats": repeats},
                             "bytes_moved": 0, "results": results,
                             "busy": {"ratio": tn / t1, "meets_goal": tn <= GOAL_RATIO * t1}})
                print(f"busy/{name} {params}: 1 thread {t1 * 1e3:.2f} ms, {many} threads {tn * 1e3:.2f} ms "
                      f"({tn / t1:.2f}x){'' if tn <= GOAL_RATIO * t1 else '  (misses goal)'}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    run("cpu", "--quick" in sys.argv)
