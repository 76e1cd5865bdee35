"""Checks that run inside every rank of a multi-process gloo group (see
tests/test_distributed.py).  One spawned group runs all of them in turn, which
amortises process start-up; each check raises AssertionError on failure.  A check
must issue the same collectives on every rank, also when it fails, or the checks
after it would time out."""
from __future__ import annotations

import math
import traceback

import torch
import torch.distributed as dist

from rlkernels.distributed import DecentralizedAverager, average_parameters, gossip_average, ring_all_reduce

CHECKS: dict = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def run_suite(rank: int, world: int, names: list[str]) -> dict:
    """Runs the named checks; returns {name: None or the traceback}."""
    outcome = {}
    for name in names:
        torch.manual_seed(1234 + rank)
        try:
            CHECKS[name](rank, world)
            outcome[name] = None
        except Exception:  # noqa: BLE001 - reported per check
            outcome[name] = traceback.format_exc()
    return outcome


# ---- helpers ------------------------------------------------------------------------------------

def integer_valued(shape, dtype, low=-20, high=20, gen=None) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen).to(dtype)


def all_reduce_truth(t: torch.Tensor, world: int, mean: bool) -> torch.Tensor:
    ref = t.clone()
    dist.all_reduce(ref)
    return ref / world if mean else ref


def gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def assert_same_on_every_rank(tensors: list[torch.Tensor], world: int, what: str) -> None:
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    everyone = gather(flat, world)
    for r, other in enumerate(everyone):
        assert torch.equal(other, everyone[0]), f"{what}: rank {r} differs from rank 0"


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs().max().item()
        raise AssertionError(f"{what}: not bitwise equal (max diff {diff:.3e})")


def expect_error(fn, error, match: str) -> None:
    try:
        fn()
    except error as exc:
        assert match in str(exc), f"expected {match!r} in: {exc}"
        return
    raise AssertionError(f"expected {error.__name__}({match!r})")


# ---- ring_all_reduce ----------------------------------------------------------------------------

@check
def ring_equals_all_reduce(rank, world):
    # (numel, segment_mb): one segment per chunk, or several (pipelined), incl. ragged ones
    cases = [(1, 1.0), (2, 1.0), (3, 1.0), (5, 1.0), (7, 1.0), (world + 1, 1.0), (1001, 1 / 1024),
             (4099, 1 / 1024), (65537, 1.0), (3001, 1e-4)]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for numel, segment_mb in cases if dtype == torch.float32 else cases[-4::2]:
            if True:
                x = integer_valued((numel,), dtype)
                for op in ("sum", "mean"):
                    ours = ring_all_reduce(x.clone(), op=op, segment_mb=segment_mb)
                    expected = all_reduce_truth(x, world, op == "mean")
                    assert_bitwise(ours, expected, f"{dtype} numel={numel} seg={segment_mb} op={op}")
    # any shape, non-contiguous input, random values: same result on every rank, close to all_reduce
    x = torch.randn(37, 29).t()
    expected = all_reduce_truth(x, world, True)
    ours = ring_all_reduce(x, segment_mb=1 / 1024)
    assert ours is x
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)
    assert_same_on_every_rank([ours], world, "ring result")
    # a tensor with fewer elements than ranks, and an empty one
    tiny = integer_valued((1,), torch.float32)
    assert_bitwise(ring_all_reduce(tiny.clone(), op="sum"), all_reduce_truth(tiny, world, False), "numel 1")
    assert ring_all_reduce(torch.empty(0)).numel() == 0


@check
def ring_parameters_with_grad(rank, world):
    layer = torch.nn.Linear(6, 5)
    expected = all_reduce_truth(layer.weight.detach(), world, True)
    out = ring_all_reduce(layer.weight)
    assert out is layer.weight and layer.weight.requires_grad
    torch.testing.assert_close(layer.weight.detach(), expected, atol=1e-6, rtol=1e-6)


# ---- average_parameters -------------------------------------------------------------------------

@check
def average_parameters_equals_all_reduce(rank, world):
    gen = torch.Generator().manual_seed(99)  # the same shapes on every rank
    shapes = [tuple(torch.randint(1, 9, (int(torch.randint(1, 3, (1,), generator=gen)),), generator=gen).tolist())
              for _ in range(1000)]
    for dtype in (torch.float32, torch.bfloat16):
        for bucket_mb in (25, 0.004):  # one bucket; ~100 buckets
            for op in ("mean", "sum"):
                tensors = [integer_valued(s, dtype) for s in shapes]
                # One all_reduce of everything concatenated is the truth: on integer-valued
                # data the sum does not depend on how the values are grouped.
                truth = all_reduce_truth(torch.cat([t.reshape(-1) for t in tensors]), world, op == "mean")
                expected = [part.view(t.shape) for part, t in
                            zip(truth.split([t.numel() for t in tensors]), tensors)]
                average_parameters(tensors, op=op, bucket_mb=bucket_mb)
                for i, (a, b) in enumerate(zip(tensors, expected)):
                    assert_bitwise(a, b, f"{dtype} bucket_mb={bucket_mb} op={op} tensor {i}")
    # mixed dtypes in one list: bucketed per dtype, each exact
    mixed = [integer_valued((5, 3), torch.float32), integer_valued((7,), torch.float64),
             integer_valued((2, 2), torch.bfloat16), integer_valued((11,), torch.float16),
             integer_valued((4,), torch.float32)]
    expected = [all_reduce_truth(t, world, True) for t in mixed]
    average_parameters(mixed)
    for i, (a, b) in enumerate(zip(mixed, expected)):
        assert_bitwise(a, b, f"mixed list tensor {i}")


@check
def average_parameters_module_and_random_values(rank, world):
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))
    before = [p.detach().clone() for p in model.parameters()]
    expected = [all_reduce_truth(p, world, True) for p in before]
    average_parameters(model, bucket_mb=0.001)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-6)
        assert p.requires_grad
    assert_same_on_every_rank(list(model.parameters()), world, "averaged module")


@check
def average_parameters_compressed(rank, world):
    x = torch.randn(5000, dtype=torch.float64) * (rank + 1)
    truth = all_reduce_truth(x, world, True)
    for compress, unit in (("bf16", 2.0 ** -8), ("fp16", 2.0 ** -11)):
        ours = x.float()
        average_parameters([ours], compress=compress)
        bound = (world + 2) * unit * x.abs().max().item() * world
        err = (ours.double() - truth).abs().max().item()
        assert 0 < err <= bound, f"{compress}: error {err:.3e} not in (0, {bound:.3e}]"
        assert_same_on_every_rank([ours], world, f"compress={compress}")
    # fp16 tops out at 65504: pre-scaling by 1/n keeps the sum of n values near it finite
    big = torch.full((100,), 60000.0)
    average_parameters([big], compress="fp16")
    assert torch.isfinite(big).all() and (big - 60000.0).abs().max() <= 32, big[:4]
    summed = torch.full((100,), 1000.0)
    average_parameters([summed], op="sum", compress=torch.float16)
    assert torch.equal(summed, torch.full((100,), 1000.0 * world))


# ---- gossip_average -----------------------------------------------------------------------------

def disagreement(x: torch.Tensor, world: int) -> float:
    """sqrt(sum_i ||x_i - mean||^2) over the ranks."""
    mean = all_reduce_truth(x, world, True)
    sq = ((x - mean) ** 2).sum().reshape(1)
    dist.all_reduce(sq)
    return math.sqrt(sq.item())


@check
def gossip_matches_mixing_formula(rank, world):
    x = torch.randn(1000, dtype=torch.float64)
    everyone = gather(x, world)
    w = (0.5, 0.25, 0.25) if world == 2 else (1 / 3, 1 / 3, 1 / 3)
    expected = w[0] * everyone[rank] + w[1] * everyone[(rank - 1) % world] + w[2] * everyone[(rank + 1) % world]
    gossip_average(x)
    torch.testing.assert_close(x, expected, atol=1e-12, rtol=1e-12)
    # asymmetric weights: left and right are told apart
    y = torch.randn(300, dtype=torch.float64)
    everyone = gather(y, world)
    w = (0.5, 0.375, 0.125)
    if world == 2:
        expected = 0.5 * everyone[rank] + 0.5 * everyone[1 - rank]
    else:
        expected = w[0] * everyone[rank] + w[1] * everyone[(rank - 1) % world] + w[2] * everyone[(rank + 1) % world]
    gossip_average([y], weights=w)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)


@check
def gossip_keeps_the_mean(rank, world):
    x = torch.randn(4097, dtype=torch.float64) * 10
    mean_before = all_reduce_truth(x, world, True)
    for _ in range(3):
        gossip_average(x)
    torch.testing.assert_close(all_reduce_truth(x, world, True), mean_before, atol=1e-12, rtol=0)
    # exactly, when every product and sum is exact: dyadic weights on small integers
    y = integer_valued((999,), torch.float64, -1000, 1000)
    sum_before = all_reduce_truth(y, world, False)
    gossip_average(y, weights=(0.5, 0.25, 0.25))
    assert_bitwise(all_reduce_truth(y, world, False), sum_before, "sum after a dyadic gossip round")


@check
def gossip_consensus_rate(rank, world):
    """Disagreement shrinks by the second-largest eigenvalue magnitude of the mixing
    matrix per round: 1/3 at 4 ranks with weights 1/3, 0 at 3 ranks, 0 at 2 (1/2 each)."""
    x = torch.randn(2048, dtype=torch.float64)
    expected_rate = {2: 0.0, 3: 0.0, 4: 1 / 3}.get(world)
    start = disagreement(x, world)
    for _ in range(3):
        before = disagreement(x, world)
        gossip_average(x)
        after = disagreement(x, world)
        if expected_rate is not None:
            assert abs(after / before - expected_rate) < 1e-9 + (1e-12 * start / before), (after / before)
        else:  # larger rings: at most 1/3 + 2/3 cos(2 pi / n)
            assert after / before <= 1 / 3 + 2 / 3 * math.cos(2 * math.pi / world) + 1e-9


@check
def gossip_mixed_dtypes_module(rank, world):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).to(torch.float32)
    model[1].to(torch.bfloat16)
    params = list(model.parameters())
    everyone = [gather(p.detach(), world) for p in params]
    w = (0.5, 0.25, 0.25) if world == 2 else (1 / 3, 1 / 3, 1 / 3)
    gossip_average(model, bucket_mb=0.0005)
    for p, all_p in zip(params, everyone):
        acc = [t.float() for t in all_p]
        expected = (w[0] * acc[rank] + w[1] * acc[(rank - 1) % world] + w[2] * acc[(rank + 1) % world]).to(p.dtype)
        tol = dict(atol=1e-6, rtol=1e-6) if p.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(p.detach(), expected, **tol)


# ---- DecentralizedAverager ----------------------------------------------------------------------

def _model(dtype=torch.float64):
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2)).to(dtype)


def _local_delta(rank: int, p: torch.Tensor, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01


@check
def averager_round_semantics(rank, world):
    for mode in ("allreduce", "ring"):
        for alpha in (1.0, 0.5, 2.0):
            torch.manual_seed(rank)  # different initial weights per rank
            model = _model()
            averager = DecentralizedAverager(model, mode=mode, every=2, alpha=alpha, bucket_mb=0.0005)
            assert_same_on_every_rank(list(model.parameters()), world, f"{mode}: parameters after broadcast")
            theta0 = [p.detach().clone() for p in model.parameters()]
            for step in range(2):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(_local_delta(rank, p, step))
                ran = averager.step()
                assert ran == (step == 1), (mode, step, ran)
                if step == 0:  # no round yet: parameters are local
                    assert not torch.equal(model[0].weight, theta0[0])
            assert_same_on_every_rank(list(model.parameters()), world, f"{mode}: parameters after a round")
            for p, t0 in zip(model.parameters(), theta0):
                local = p.detach()  # equals theta_global now
                deltas = []
                for r in range(world):
                    deltas.append(_local_delta(r, p, 0) + _local_delta(r, p, 1))
                expected = t0 + alpha * torch.stack(deltas).mean(0)
                torch.testing.assert_close(local, expected, atol=1e-12, rtol=1e-12)
            for g, p in zip(averager.theta_global, model.parameters()):
                assert torch.equal(g, p.detach())
            assert averager.rounds == 1 and averager.steps == 2


@check
def averager_modes_agree_float32(rank, world):
    results = {}
    for mode in ("allreduce", "ring"):
        torch.manual_seed(7)
        model = torch.nn.Linear(300, 70)
        averager = DecentralizedAverager(model, mode=mode, alpha=0.7)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(_local_delta(rank, p, 0))
        averager.step()
        results[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert_same_on_every_rank(list(model.parameters()), world, mode)
    torch.testing.assert_close(results["ring"], results["allreduce"], atol=1e-6, rtol=1e-6)
    # state_dict round trip keeps theta_global and the counters
    state = averager.state_dict()
    averager.load_state_dict(state)
    assert averager.steps == 1 and averager.rounds == 1


@check
def averager_gossip_mode(rank, world):
    torch.manual_seed(rank)
    model = _model()
    params = list(model.parameters())
    means = [all_reduce_truth(p.detach(), world, True) for p in params]
    before = [gather(p.detach(), world) for p in params]
    averager = DecentralizedAverager(model, mode="gossip", every=1, alpha=0.5)
    assert not torch.equal(params[0].detach(), before[0][(rank + 1) % world])  # no initial broadcast
    averager.step()
    w = (0.5, 0.25, 0.25) if world == 2 else (1 / 3, 1 / 3, 1 / 3)
    for p, mean, all_p in zip(params, means, before):
        mix = w[0] * all_p[rank] + w[1] * all_p[(rank - 1) % world] + w[2] * all_p[(rank + 1) % world]
        expected = all_p[rank] + 0.5 * (mix - all_p[rank])
        torch.testing.assert_close(p.detach(), expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(all_reduce_truth(p.detach(), world, True), mean, atol=1e-12, rtol=0)
    expect_error(lambda: averager.theta_global, AttributeError, "keeps no theta_global")


@check
def averager_optimizer_state(rank, world):
    for mode in ("allreduce", "ring", "gossip"):
        torch.manual_seed(3)
        model = _model(torch.float32)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        averager = DecentralizedAverager(model, mode=mode, every=2, optimizer=optimizer,
                                         average_optimizer_state=True)
        gen = torch.Generator().manual_seed(rank)
        for step in range(2):
            loss = model(torch.randn(16, 5, generator=gen)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 1:
                moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
                means = [all_reduce_truth(m, world, True) for m in moments]
            averager.step()
        for p, mean in zip(model.parameters(), means):
            exp_avg = optimizer.state[p]["exp_avg"]
            if mode == "gossip":
                torch.testing.assert_close(all_reduce_truth(exp_avg, world, True), mean, atol=1e-6, rtol=1e-5)
            else:
                torch.testing.assert_close(exp_avg, mean, atol=1e-7, rtol=1e-5)
        if mode != "gossip":
            assert_same_on_every_rank([optimizer.state[p]["exp_avg_sq"] for p in model.parameters()], world,
                                      f"{mode}: exp_avg_sq")


# ---- sub-groups: group ranks map to the right global ranks ------------------------------------------

@check
def subgroups(rank, world):
    evens, odds = list(range(0, world, 2)), list(range(1, world, 2))
    groups = [dist.new_group(evens), dist.new_group(odds)]  # every rank creates both, in order
    mine = groups[rank % 2]
    members = evens if rank % 2 == 0 else odds
    size = len(members)
    x = integer_valued((1001,), torch.float32)
    truth = x.clone()
    dist.all_reduce(truth, group=mine)
    assert_bitwise(ring_all_reduce(x.clone(), group=mine, op="sum", segment_mb=1 / 1024), truth, "ring on a group")
    tensors = [x.clone(), x[:7].clone()]
    average_parameters(tensors, group=mine)
    assert_bitwise(tensors[0], truth / size, "average_parameters on a group")
    y = torch.randn(64, dtype=torch.float64)
    everyone = [torch.empty_like(y) for _ in range(size)]
    dist.all_gather(everyone, y, group=mine)
    me = members.index(rank)
    gossip_average(y, group=mine)
    if size == 1:
        expected = everyone[0]
    elif size == 2:
        expected = 0.5 * everyone[me] + 0.5 * everyone[1 - me]
    else:
        expected = (everyone[me] + everyone[(me - 1) % size] + everyone[(me + 1) % size]) / 3
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    model = torch.nn.Linear(4, 3)
    averager = DecentralizedAverager(model, group=mine)  # broadcasts from the group's first rank
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(gathered, flat, group=mine)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "averager broadcast within the group"
    assert averager.rounds == 0


# ---- errors: every rank raises the same error, and the group stays usable -----------------------

@check
def mismatched_shapes_are_reported(rank, world):
    last = world - 1
    shape = (3, 4) if rank != last else (4, 3)
    tensors = [torch.zeros(2), torch.zeros(shape)]
    expect_error(lambda: average_parameters(tensors), ValueError,
                 f"params[1] is float32[3, 4] on rank 0 but float32[4, 3] on rank {last}")
    extra = [torch.zeros(2)] + ([torch.zeros(1)] if rank == last else [])
    expect_error(lambda: gossip_average(extra), ValueError, f"rank 0 has 1 tensors, rank {last} has 2")
    dtype = torch.float32 if rank != last else torch.float64
    expect_error(lambda: ring_all_reduce(torch.zeros(5, dtype=dtype)), ValueError,
                 f"tensor[0] is float32[5] on rank 0 but float64[5] on rank {last}")
    expect_error(lambda: ring_all_reduce(torch.zeros(5 + (rank == last))), ValueError, "differ across ranks")
    model = torch.nn.Linear(3, 2 if rank != last else 3)
    expect_error(lambda: DecentralizedAverager(model), ValueError, "params differ across ranks")
    # the group is still in step
    ok = torch.ones(1)
    dist.all_reduce(ok)
    assert ok.item() == world
