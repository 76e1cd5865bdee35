"""Rank-side checks of rlkernels.distributed.vocab_parallel (run by
tests/test_vocab_parallel.py on 2 and 4 gloo ranks).  Every rank builds the same
full-vocabulary inputs from one seed, takes its shard, and compares the sharded op
with the unsharded one: values, entropy, KL and the gradient of its own shard."""
from __future__ import annotations

import contextlib
import os
import time
import traceback

import torch
import torch.distributed as dist

import rlkernels
from rlkernels.distributed import vocab_parallel as VP


def shard_bounds(vocab: int, world: int, rank: int, uneven: bool = True) -> tuple[int, int]:
    """Contiguous shards in rank order; uneven sizes (the last takes the rest)."""
    if uneven:
        weights = [(r % 3) + 1 for r in range(world)]
    else:
        weights = [1] * world
    cuts = [0]
    for w in weights[:-1]:
        cuts.append(cuts[-1] + vocab * w // sum(weights))
    cuts.append(vocab)
    return cuts[rank], cuts[rank + 1]


def _close(a, b, what, rtol=2e-5, atol=2e-5):
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    if not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True):
        diff = (a.double() - b.double()).abs().nan_to_num(0).max().item()
        raise AssertionError(f"{what}: max abs difference {diff:g}")


def _labels(g, shape, vocab, ignore_index=-100, ignored=0.2):
    labels = torch.randint(0, vocab, shape, generator=g)
    drop = torch.rand(shape, generator=g) < ignored
    return torch.where(drop, torch.full_like(labels, ignore_index), labels)


def check_logprobs(rank, world, *, vocab=1000, dtype=torch.float32, backend="cpu", temperature=0.7, tol=2e-5):
    g = torch.Generator().manual_seed(11)
    full = (3 * torch.randn(2, 5, vocab, generator=g)).to(dtype)
    full[0, 1, 7] = float("-inf")  # -inf logits stay exact
    labels = _labels(g, (2, 5), vocab)
    labels[1, 0] = vocab - 1  # the last shard's last column
    labels[1, 1] = 0  # the first shard's first column
    gl, gh = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    v0, v1 = shard_bounds(vocab, world, rank)
    x = full.clone().requires_grad_(True)
    want_lp, want_h = rlkernels.logprobs(x, labels, temperature=temperature, entropy=True, backend=backend)
    (want_lp * gl + want_h * gh).sum().backward()
    shard = full[..., v0:v1].clone().requires_grad_(True)
    lp, h = VP.logprobs(shard, labels, group=None, temperature=temperature, entropy=True, backend=backend,
                        timeout=60)
    (lp * gl + h * gh).sum().backward()
    _close(lp, want_lp, "log-probs", tol, tol)
    _close(h, want_h, "entropy", tol, tol)
    grad_tol = tol if dtype == torch.float32 else 2e-2
    _close(shard.grad.float(), x.grad[..., v0:v1].float(), "gradient of the shard", grad_tol, grad_tol)
    lp_only = VP.logprobs(full[..., v0:v1], labels, group=None, temperature=temperature, backend=backend)
    _close(lp_only, want_lp.detach(), "log-probs without entropy", tol, tol)


def check_logprobs_bf16(rank, world):
    check_logprobs(rank, world, dtype=torch.bfloat16, tol=1e-4)


def check_logprobs_gpt2_vocab(rank, world):
    check_logprobs(rank, world, vocab=50257)


def check_logprobs_reference(rank, world):
    check_logprobs(rank, world, backend="reference", tol=1e-5)


def _triton_runs_here() -> bool:
    return rlkernels.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors: interpreter only


def check_logprobs_triton(rank, world):
    if not _triton_runs_here():
        return
    check_logprobs(rank, world, vocab=97, backend="triton")


def check_kl(rank, world, *, vocab=999, dtype=torch.float32, backend="cpu", tol=2e-5):
    g = torch.Generator().manual_seed(12)
    a = (2 * torch.randn(3, 4, vocab, generator=g)).to(dtype)
    b = (2 * torch.randn(3, 4, vocab, generator=g)).to(dtype)
    mask = torch.rand(3, 4, generator=g) > 0.25
    gk = torch.randn(3, 4, generator=g)
    v0, v1 = shard_bounds(vocab, world, rank)
    xa, xb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    want = rlkernels.kl_from_logits(xa, xb, temperature=1.3, mask=mask, backend=backend)
    (want * gk).sum().backward()
    sa, sb = a[..., v0:v1].clone().requires_grad_(True), b[..., v0:v1].clone().requires_grad_(True)
    kl = VP.kl_from_logits(sa, sb, group=None, temperature=1.3, mask=mask, backend=backend)
    (kl * gk).sum().backward()
    _close(kl, want, "KL", tol, tol)
    _close(sa.grad.float(), xa.grad[..., v0:v1].float(), "KL gradient (logits)", tol, tol)
    _close(sb.grad.float(), xb.grad[..., v0:v1].float(), "KL gradient (ref_logits)", tol, tol)


def check_kl_reference(rank, world):
    check_kl(rank, world, backend="reference", tol=1e-5)


def check_kl_triton(rank, world):
    if not _triton_runs_here():
        return
    check_kl(rank, world, vocab=61, backend="triton")


def check_linear(rank, world, *, backend="cpu", dtype=torch.float32, tol=5e-5):
    g = torch.Generator().manual_seed(13)
    vocab, H = 777, 24
    hidden = torch.randn(3, 6, H, generator=g).to(dtype)
    weight = (0.3 * torch.randn(vocab, H, generator=g)).to(dtype)
    bias = (0.1 * torch.randn(vocab, generator=g)).to(dtype)
    labels = _labels(g, (3, 6), vocab)
    gl, gh = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    v0, v1 = shard_bounds(vocab, world, rank)
    xh, xw, xb = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    want_lp, want_h = rlkernels.linear_logprobs(xh, xw, labels, bias=xb, temperature=0.9, entropy=True,
                                                backend=backend)
    (want_lp * gl + want_h * gh).sum().backward()
    sh = hidden.clone().requires_grad_(True)
    sw, sb = weight[v0:v1].clone().requires_grad_(True), bias[v0:v1].clone().requires_grad_(True)
    lp, h = VP.linear_logprobs(sh, sw, labels, group=None, bias=sb, temperature=0.9, entropy=True, backend=backend)
    (lp * gl + h * gh).sum().backward()
    _close(lp, want_lp, "linear log-probs", tol, tol)
    _close(h, want_h, "linear entropy", tol, tol)
    _close(sh.grad, xh.grad, "hidden gradient (summed over shards)", tol, tol)
    _close(sw.grad, xw.grad[v0:v1], "weight shard gradient", tol, tol)
    _close(sb.grad, xb.grad[v0:v1], "bias shard gradient", tol, tol)


def check_linear_reference(rank, world):
    check_linear(rank, world, backend="reference", dtype=torch.float64, tol=1e-9)


def check_linear_ppo_loss(rank, world):
    g = torch.Generator().manual_seed(14)
    vocab, H, B, T = 513, 16, 3, 7
    hidden = torch.randn(B, T, H, generator=g)
    weight = 0.3 * torch.randn(vocab, H, generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    old = -6.0 + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    ref = old - 0.05
    v0, v1 = shard_bounds(vocab, world, rank)
    xh, xw = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    kwargs = dict(ref_logprobs=ref, beta=0.04, entropy_coef=0.01, agg="seq-mean-token-mean", clip_high=0.28)
    want, want_stats = rlkernels.linear_ppo_loss(xh, xw, labels, old, adv, mask, **kwargs)
    want.backward()
    sh, sw = hidden.clone().requires_grad_(True), weight[v0:v1].clone().requires_grad_(True)
    loss, stats = VP.linear_ppo_loss(sh, sw, labels, old, adv, mask, group=None, **kwargs)
    loss.backward()
    _close(loss, want, "linear_ppo_loss", 1e-5, 1e-6)
    for key in want_stats:
        _close(stats[key], want_stats[key], f"stats[{key!r}]", 1e-5, 1e-6)
    _close(sh.grad, xh.grad, "hidden gradient", 1e-5, 1e-6)
    _close(sw.grad, xw.grad[v0:v1], "weight shard gradient", 1e-5, 1e-6)


def check_empty_shard(rank, world):
    """A rank with no columns (rank 1) still takes part and gets the full result."""
    vocab = 30
    cuts = [0, 0, 30] if world == 2 else [0, 10, 10, 20, 30]
    v0, v1 = cuts[rank], cuts[rank + 1]
    g = torch.Generator().manual_seed(16)
    full, ref = torch.randn(5, vocab, generator=g), torch.randn(5, vocab, generator=g)
    labels = torch.randint(0, vocab, (5,), generator=g)
    x = full.clone().requires_grad_(True)
    want = rlkernels.logprobs(x, labels, entropy=True)
    (want[0] + want[1]).sum().backward()
    shard = full[:, v0:v1].clone().requires_grad_(True)
    lp, h = VP.logprobs(shard, labels, group=None, entropy=True)
    (lp + h).sum().backward()
    _close(lp, want[0], "log-probs")
    _close(h, want[1], "entropy")
    _close(shard.grad, x.grad[:, v0:v1], "gradient of the shard")
    _close(VP.kl_from_logits(full[:, v0:v1], ref[:, v0:v1], group=None), rlkernels.kl_from_logits(full, ref), "KL")


@contextlib.contextmanager
def counted_all_gathers():
    """Yields a list that receives (dtype, shape) of every dist.all_gather made inside."""
    calls, original = [], dist.all_gather

    def counting(out, tensor, *args, **kwargs):
        calls.append((tensor.dtype, tuple(tensor.shape)))
        return original(out, tensor, *args, **kwargs)

    dist.all_gather = counting
    try:
        yield calls
    finally:
        dist.all_gather = original


def check_one_collective_without_check(rank, world):
    """check=False with vocab_start: one all_gather a call, of 5 float32 a token; the
    backward of the logits ops talks to nobody."""
    vocab, N = 300, 8
    v0, v1 = shard_bounds(vocab, world, rank)
    g = torch.Generator().manual_seed(15)
    full = torch.randn(N, vocab, generator=g)
    labels = torch.randint(0, vocab, (N,), generator=g)
    with counted_all_gathers() as calls:
        shard = full[:, v0:v1].clone().requires_grad_(True)
        lp = VP.logprobs(shard, labels, group=None, vocab_start=v0, check=False)
        lp.sum().backward()
    if calls != [(torch.float32, (N, VP.STAT_WIDTH))]:
        raise AssertionError(f"expected one all_gather of [N, {VP.STAT_WIDTH}] float32, got {calls}")
    _close(lp, rlkernels.logprobs(full, labels), "log-probs with check=False")


def check_public_functions_take_group(rank, world):
    """rlkernels.logprobs / kl_from_logits / linear_logprobs / linear_ppo_loss with group=."""
    vocab = 211
    v0, v1 = shard_bounds(vocab, world, rank)
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(17)
    full, ref = torch.randn(6, vocab, generator=g), torch.randn(6, vocab, generator=g)
    labels = torch.randint(0, vocab, (6,), generator=g)
    lp, h = rlkernels.logprobs(full[:, v0:v1], labels, entropy=True, group=group)
    want_lp, want_h = rlkernels.logprobs(full, labels, entropy=True)
    _close(lp, want_lp, "logprobs(group=)")
    _close(h, want_h, "entropy with group=")
    _close(rlkernels.kl_from_logits(full[:, v0:v1], ref[:, v0:v1], group=group), rlkernels.kl_from_logits(full, ref),
           "kl_from_logits(group=)")
    hidden, weight = torch.randn(2, 3, 8, generator=g), torch.randn(vocab, 8, generator=g)
    tokens = torch.randint(0, vocab, (2, 3), generator=g)
    _close(rlkernels.linear_logprobs(hidden, weight[v0:v1], tokens, group=group),
           rlkernels.linear_logprobs(hidden, weight, tokens), "linear_logprobs(group=)", 5e-5, 5e-5)
    old, adv = torch.full((2, 3), -5.0), torch.randn(2, 3, generator=g)
    loss, _ = rlkernels.linear_ppo_loss(hidden, weight[v0:v1], tokens, old, adv, group=group, clip_low=0.1)
    want, _ = rlkernels.linear_ppo_loss(hidden, weight, tokens, old, adv, clip_low=0.1)
    _close(loss, want, "linear_ppo_loss(group=)", 1e-5, 1e-6)
    for call, words in ((lambda: rlkernels.logprobs(full[:, v0:v1], labels, group=group, inplace_backward=True),
                         "inplace_backward"),
                        (lambda: rlkernels.linear_logprobs(hidden, weight[v0:v1], tokens, group=group, is_top1=True),
                         "is_top1")):
        try:
            call()
        except ValueError as exc:
            if words not in str(exc):
                raise AssertionError(f"error does not name {words}: {exc}") from exc
        else:
            raise AssertionError(f"{words} with group= did not raise")


def check_mismatch_tokens(rank, world):
    n = 4 if rank != world - 1 else 5
    _expect_mismatch(lambda: VP.logprobs(torch.randn(n, 10), torch.zeros(n, dtype=torch.long), group=None,
                                         timeout=60), "token count")


def check_mismatch_dtype(rank, world):
    dtype = torch.float32 if rank else torch.bfloat16
    _expect_mismatch(lambda: VP.logprobs(torch.randn(4, 10).to(dtype), torch.zeros(4, dtype=torch.long), group=None,
                                         timeout=60), "dtype")


def check_labels_out_of_range(rank, world):
    labels = torch.tensor([0, 3, 10 * world, 1])  # shards of 10: the full vocabulary is 10 * world
    _expect_mismatch(lambda: VP.logprobs(torch.randn(4, 10), labels, group=None, timeout=60),
                     f"labels must lie in \\[0, {10 * world}\\)")


def check_wrong_vocab_start(rank, world):
    _expect_mismatch(lambda: VP.logprobs(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), group=None,
                                         vocab_start=0, timeout=60), "vocab_start")


def check_different_labels(rank, world):
    labels = torch.tensor([0, 1, 2, rank])
    _expect_mismatch(lambda: VP.logprobs(torch.randn(4, 10), labels, group=None, timeout=60), "labels")


def check_double_backward_raises(rank, world):
    shard = torch.randn(3, 10, requires_grad=True)
    lp = VP.logprobs(shard, torch.tensor([1, 2, 3]), group=None)
    (grad,) = torch.autograd.grad(lp.sum(), shard, create_graph=True)
    try:
        grad.sum().backward()
    except RuntimeError as exc:
        if "twice" not in str(exc) and "once_differentiable" not in str(exc) and "does not require grad" not in str(exc):
            raise
        return
    raise AssertionError("double backward through vocab_parallel.logprobs did not raise")


def _expect_mismatch(call, words):
    import re

    try:
        call()
    except VP.VocabParallelMismatchError as exc:
        if not re.search(words, str(exc)):
            raise AssertionError(f"mismatch error does not mention {words!r}: {exc}") from exc
        return
    raise AssertionError("no VocabParallelMismatchError")


CHECKS = {name[len("check_"):]: fn for name, fn in list(globals().items())
          if name.startswith("check_") and callable(fn) and name not in ("check_logprobs", "check_kl", "check_linear")}
CHECKS.update(logprobs=check_logprobs, kl=check_kl, linear=check_linear)


def run_suite(rank: int, world: int, names: list[str], checks: dict | None = None) -> dict:
    """Runs each named check (of `checks`, CHECKS by default); returns {name: None or the
    failure's traceback}."""
    checks = CHECKS if checks is None else checks
    out = {}
    for name in names:
        try:
            checks[name](rank, world)
            out[name] = None
        except BaseException:  # noqa: BLE001 - reported per check
            out[name] = traceback.format_exc()
        try:
            dist.barrier()
        except RuntimeError:  # the ranks fell out of step: report what each saw, run no more checks
            out[name] = (out[name] or "") + "\nbarrier after the check failed:\n" + traceback.format_exc()
            return {**dict.fromkeys(names, "not run: an earlier check left the group unusable"), **out}
    return out


def fault_worker(rank: int, world: int, fault: str) -> dict:
    """Rank 1 dies (`kill`) or sleeps past the others' timeout (`stall`) before the
    call; the others must raise VocabParallelError within their timeout."""
    shard = torch.randn(4, 10)
    labels = torch.tensor([0, 1, 2, 3])
    # every rank's gloo mesh is connected before rank 1 fails (a rank that dies while the
    # others still connect to it fails their init, not the call under test)
    dist.barrier()
    if rank == 1:
        if fault == "kill":
            os._exit(3)
        time.sleep(8.0)
        return {"error": None, "seconds": 0.0}
    start = time.monotonic()
    try:
        VP.logprobs(shard, labels, group=None, timeout=2.0)
    except VP.VocabParallelError as exc:
        return {"error": type(exc).__name__ + ": " + str(exc), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}
