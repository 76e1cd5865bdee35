"""Shared pieces of the property-based tests (tests/test_properties_*.py): example
budgets, backends, value generators with extreme regimes, comparisons against the
float64 reference, and the check that bad input raises a clear error.

Budgets: RLK_HYPOTHESIS_EXAMPLES examples per property on the compiled backends
(default 100); the Triton interpreter (Triton on CPU tensors, TRITON_INTERPRET=1) runs
every program in Python, so it gets RLK_HYPOTHESIS_TRITON_EXAMPLES (default a fifth of
that, at least 6) and tiny shapes.  Examples are derandomized (a fixed sequence per
test, so CI is reproducible); RLK_HYPOTHESIS_RANDOM=1 draws fresh ones (bug hunting).
RLK_HYPOTHESIS_REPORT=path writes how many cases each test ran (COUNTS below)."""
from __future__ import annotations

import atexit
import collections
import functools
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st

from support import BACKEND_DEVICE, LOW_PRECISION_FACTOR, TOLERANCES, backend_id

DEFAULT_EXAMPLES = 100
EXAMPLES = int(os.environ.get("RLK_HYPOTHESIS_EXAMPLES", str(DEFAULT_EXAMPLES)))
TRITON_EXAMPLES = int(os.environ.get("RLK_HYPOTHESIS_TRITON_EXAMPLES", str(max(6, EXAMPLES // 5))))
DERANDOMIZE = os.environ.get("RLK_HYPOTHESIS_RANDOM", "0") != "1"

LOW = (torch.bfloat16, torch.float16)
KERNEL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
LOSS_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def computed_in(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in for inputs of `dtype`: float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_or_zeros(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x, or zeros like x where the loss does not depend on it (an empty batch)."""
    (grad,) = torch.autograd.grad(loss, x) if loss.requires_grad else (torch.zeros_like(x),)
    return grad


def interpreted(backend_device) -> bool:
    """Triton kernels running on CPU tensors in the interpreter."""
    return tuple(backend_device) == ("triton", "cpu")


def budget(backend_device, examples: int | None = None) -> settings:
    """Hypothesis settings for one property on one backend.  `examples` sets the
    compiled-backend budget at the default RLK_HYPOTHESIS_EXAMPLES (for a property whose
    cases are expensive, or whose space is small) and scales with it."""
    n = EXAMPLES if examples is None else max(1, round(examples * EXAMPLES / DEFAULT_EXAMPLES))
    if interpreted(backend_device):
        n = min(n, TRITON_EXAMPLES)
    return settings(max_examples=max(1, n), deadline=None, derandomize=DERANDOMIZE, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


backends = pytest.mark.parametrize("backend_device", BACKEND_DEVICE, ids=backend_id)

# Cases run per test (examples, shrinking and replays included).  The @given functions
# live inside the parametrized tests (one budget per backend), where hypothesis'
# --hypothesis-show-statistics does not see them: RLK_HYPOTHESIS_REPORT=path writes
# these counts as JSON at exit.
COUNTS: collections.Counter = collections.Counter()


def counted(fn):
    """Counts the cases a property function runs, under the current pytest test id."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        COUNTS[os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]] += 1
        return fn(*args, **kwargs)
    return wrapper


def _write_counts(path: str) -> None:
    with open(path, "w") as f:
        json.dump(dict(sorted(COUNTS.items())), f, indent=1)


if os.environ.get("RLK_HYPOTHESIS_REPORT"):
    atexit.register(_write_counts, os.environ["RLK_HYPOTHESIS_REPORT"])


# ---- values ----------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
# what masked or ignored slots hold: nothing special, NaN or an infinity
poisons = st.sampled_from([None, math.nan, math.inf, -math.inf])
# How the finite values are spread: ordinary, wide, huge (1e4: exact differences in
# float32 lose the low bits), tiny (denormal range for float32), ties (many equal
# values, also at the maximum).
REGIMES = ("normal", "wide", "huge", "tiny", "ties")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fill(shape, g: torch.Generator, regime: str = "normal", dtype=torch.float32) -> torch.Tensor:
    """Random values of `shape` in the given regime, rounded to `dtype` (so the
    float64 reference sees exactly the values the kernel reads)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if regime == "wide":
        x = x * 30
    elif regime == "huge":
        x = x * 1e4
    elif regime == "tiny":
        x = x * 1e-39
    elif regime == "ties":
        x = torch.randint(-2, 3, shape, generator=g).double()
    return x.to(dtype)


def sprinkle(x: torch.Tensor, g: torch.Generator, value: float, fraction: float) -> torch.Tensor:
    """x with `value` in a random `fraction` of its entries."""
    hit = torch.rand(x.shape, generator=g) < fraction
    return torch.where(hit, torch.full_like(x, value), x)


def poison_where(x: torch.Tensor, keep: torch.Tensor, poison: float | None) -> torch.Tensor:
    """x with `poison` (NaN, inf, -inf or None for nothing) where `keep` is False."""
    if poison is None:
        return x
    return torch.where(keep, x, torch.full_like(x, poison))


def random_mask(shape, g: torch.Generator, density: float, empty_row: bool = False) -> torch.Tensor:
    mask = torch.rand(shape, generator=g) < density
    if empty_row and mask.dim() >= 1 and mask.shape[0] > 0:
        mask[0] = False
    return mask


def strided_like(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of x in a tensor of another memory layout: "contiguous", "sliced"
    (rows of a longer buffer, like logits[:, :-1]), "transposed" (leading dims swapped),
    "vocab_strided" (a step of 2 along the last dim) or "offset" (a storage offset)."""
    if layout == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if layout == "sliced" and x.dim() >= 2:
        shape = list(x.shape)
        shape[-2] += 1
        big = torch.empty(shape, dtype=x.dtype).fill_(float("nan")) if x.dtype.is_floating_point else \
            torch.zeros(shape, dtype=x.dtype)
        big[..., :-1, :] = x
        return big[..., :-1, :]
    if layout == "transposed" and x.dim() >= 3:
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "vocab_strided":
        big = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "offset":
        flat = torch.zeros(x.numel() + 3, dtype=x.dtype)
        flat[3:] = x.reshape(-1)
        return flat[3:].view(x.shape)
    return x.contiguous()


LAYOUTS = ("contiguous", "sliced", "transposed", "vocab_strided", "offset")


# ---- comparisons ----------------------------------------------------------------------------

def close(actual: torch.Tensor, expected: torch.Tensor, *, computed_in=torch.float32, what: str = "",
          elementwise: bool = True, same_dtype: torch.Tensor | None = None) -> None:
    """actual against the float64 truth with the tolerance of the dtype the op computed
    in.  elementwise=False scales the absolute tolerance by the largest finite expected
    magnitude when that exceeds 1 (gradients and losses: float32 arithmetic on O(1)
    intermediates such as log p errs by ~1e-7 absolutely, whatever the result's size,
    and a result of size s >> 1 carries errors of ~1e-7 s in its small entries).

    same_dtype: PyTorch's own result computed in `computed_in`, for ops whose float64
    truth `computed_in` cannot always reach (ill-conditioned: a branch of max() or clamp
    decided by the last bit, a difference of huge inputs, exp overflowing to inf):
    the low precision rule entry by entry, |actual - truth| <= LOW_PRECISION_FACTOR x
    |PyTorch's - truth| also passes, and where float64 holds a value that `computed_in`
    cannot (finite in one, not in the other) actual may be PyTorch's value."""
    tol = TOLERANCES[computed_in]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    expected = _beyond_range(actual, expected, same_dtype)
    atol = tol["atol"]
    if not elementwise:
        finite = expected[torch.isfinite(expected)]
        atol = atol * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    if same_dtype is not None:
        same_err = (same_dtype.detach().double().cpu() - expected).abs().nan_to_num(0.0, 0.0, 0.0)
        within = (actual - expected).abs() <= LOW_PRECISION_FACTOR * same_err
        expected = torch.where(within & torch.isfinite(expected), actual, expected)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _beyond_range(actual: torch.Tensor, expected: torch.Tensor, same_dtype: torch.Tensor | None) -> torch.Tensor:
    """expected, with the entries that the arithmetic dtype cannot represent (finite in
    float64 but not in PyTorch's same-dtype result, or the other way round) replaced by
    actual where actual is what PyTorch's same-dtype result is (the same non-finite value,
    or finite like it)."""
    if same_dtype is None:
        return expected
    same_dtype = same_dtype.detach().double().cpu()
    unrepresentable = torch.isfinite(expected) != torch.isfinite(same_dtype)
    matches = (actual == same_dtype) | (torch.isnan(actual) & torch.isnan(same_dtype)) | (
        torch.isfinite(actual) & torch.isfinite(same_dtype))
    return torch.where(unrepresentable & matches, actual, expected)


def rounded_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, what: str = "",
                  same_dtype: torch.Tensor | None = None) -> None:
    """A result written in a 16-bit dtype from float32 arithmetic: at most twice the error
    of rounding the float64 truth to that dtype (the low precision rule with the best
    same-dtype answer as PyTorch's), plus the float32 tolerance (scaled as in close with
    elementwise=False) for the arithmetic before the rounding."""
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    assert actual.shape == expected.shape, what
    expected = _beyond_range(actual, expected, same_dtype)
    if same_dtype is not None:  # the low precision rule entry by entry, as in close()
        same_err = (same_dtype.detach().double().cpu() - expected).abs().nan_to_num(0.0, 0.0, 0.0)
        within = (actual - expected).abs() <= LOW_PRECISION_FACTOR * same_err
        expected = torch.where(within & torch.isfinite(expected), actual, expected)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern differs"
    if not finite.any():
        return
    rounding = (expected.to(dtype).double() - expected)[finite].abs().max().item()
    scale = expected[finite].abs().max().item()
    err = (actual - expected)[finite].abs().max().item()
    bound = 2 * rounding + TOLERANCES[torch.float32]["atol"] * max(1.0, scale)
    assert err <= bound, f"{what}: error {err:.3e} exceeds {bound:.3e} (rounding {rounding:.3e}, scale {scale:.3e})"


UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def low_precision_close(ours: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor,
                        dtype: torch.dtype, scale: float, *, what: str = "") -> None:
    """The low precision rule for results of 16-bit matmuls (the lm-head ops): at most
    LOW_PRECISION_FACTOR x PyTorch's same-dtype error, plus one unit roundoff of `dtype`
    times `scale`, the magnitude one rounding perturbs (e.g. max|logit| / T for log-probs).
    Over a handful of values PyTorch's own error can be accidentally tiny (its roundings
    happened to cancel), and a factor of it alone is then a coin toss, not a bound."""
    assert ours.shape == truth.shape, what
    truth = truth.detach().double().cpu()
    same = torch_same_dtype.detach().double().cpu()
    ours = ours.detach().double().cpu()
    # where PyTorch overflows the dtype too (huge k3 KL slopes in float16), only that
    # ours is no better defined is asked: the entries are left out
    keep = torch.isfinite(truth) & torch.isfinite(same)
    assert torch.equal(torch.isfinite(ours) | ~keep, torch.ones_like(keep)), f"{what}: non-finite entries"
    if not keep.any():
        return
    ours_err = (ours - truth)[keep].abs().max().item()
    torch_err = (same - truth)[keep].abs().max().item()
    bound = LOW_PRECISION_FACTOR * torch_err + UNIT_ROUNDOFF[dtype] * scale + TOLERANCES[torch.float32]["atol"]
    assert ours_err <= bound, (f"{what}: error {ours_err:.3e} exceeds {LOW_PRECISION_FACTOR} x PyTorch's "
                               f"{torch_err:.3e} + roundoff x {scale:.3e}")


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same values and NaN pattern (-0.0 and 0.0 count as equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(torch.isnan(a), torch.isnan(b)) and \
        torch.equal(a.nan_to_num(), b.nan_to_num())


def raises_naming(fn, names: tuple[str, ...] | str, errors=(ValueError, TypeError)) -> None:
    """fn() must raise ValueError or TypeError whose message names one of `names`."""
    names = (names,) if isinstance(names, str) else names
    with pytest.raises(errors) as info:
        fn()
    message = str(info.value)
    assert any(n in message for n in names), f"error {type(info.value).__name__}({message!r}) names none of {names}"


# ---- token losses -----------------------------------------------------------------------------

counts = st.one_of(st.none(), st.floats(0.5, 500.0))


def check_grad(ours, truth, dtype, what, same_dtype=None):
    """A gradient in the input dtype: float32/float64 by close(), 16-bit by rounded_close()."""
    assert ours.dtype == dtype, what
    if dtype in (torch.float32, torch.float64):
        close(ours, truth, computed_in=dtype, what=what, elementwise=False, same_dtype=same_dtype)
    else:
        rounded_close(ours, truth, dtype, what=what, same_dtype=same_dtype)


def check_stats(stats, truth, dtype, same_dtype=None):
    """Each statistic in `truth` is in `stats` and close to it in the dtype the loss computed in."""
    assert set(stats) >= set(truth), set(truth) - set(stats)
    for name, value in truth.items():
        close(stats[name], value, computed_in=computed_in(dtype), what=name, elementwise=False,
              same_dtype=None if same_dtype is None else same_dtype[name])


@st.composite
def token_batches(draw, tiny: bool):
    """[B, T] shape (long rows cross the CPU kernels' 512-token chunks), dtype, mask
    (None, random with empty rows, or all False), poison for masked slots, generator."""
    B = draw(st.integers(0, 3 if tiny else 7))
    T = draw(st.integers(0, 6)) if tiny else draw(st.one_of(st.integers(0, 40), st.sampled_from([512, 513, 1100])))
    dtype = draw(st.sampled_from(LOSS_FLOATS))
    g = generator(draw(seeds))
    kind = draw(st.sampled_from(["none", "random", "random", "empty"]))
    mask = None
    if kind == "random":
        mask = random_mask((B, T), g, draw(st.floats(0.0, 1.0)), empty_row=draw(st.booleans()))
    elif kind == "empty":
        mask = torch.zeros(B, T, dtype=torch.bool)
    if mask is not None and draw(st.booleans()):
        mask = mask.to(draw(st.sampled_from([torch.float32, torch.int64, torch.uint8])))
    return B, T, dtype, mask, draw(poisons), g


def masked_inputs(tensors, mask, poison):
    """The tensors with `poison` in the slots the mask leaves out (whole rows for [B] tensors)."""
    if mask is None or poison is None:
        return tensors
    keep = mask.bool()
    return [None if t is None else poison_where(t, keep if t.shape == keep.shape else keep.any(-1), poison)
            for t in tensors]


def as64(t):
    """t in float64, None stays None."""
    return None if t is None else t.double()


# ---- logits --------------------------------------------------------------------------------------

temperatures = st.one_of(st.sampled_from([1.0, 0.5, 2.0]), st.floats(1e-3, 100.0))


@st.composite
def logits_cases(draw, tiny: bool, *, layouts=LAYOUTS):
    """(logits, labels, options) with logits [..., V] and labels of the leading shape."""
    lead = draw(st.lists(st.integers(0, 3 if tiny else 5), max_size=3))
    if tiny:
        V = draw(st.integers(1, 24))
    else:
        V = draw(st.one_of(st.integers(1, 300), st.sampled_from([2047, 2048, 2049, 4100, 9000])))
        if V > 300:  # long rows: a few of them
            lead = lead[:1] + [1] * (len(lead) > 1)
    dtype = draw(st.sampled_from(KERNEL_FLOATS))
    regime = draw(st.sampled_from(REGIMES))
    g = generator(draw(seeds))
    logits = fill((*lead, V), g, regime, torch.float64)
    minus_inf = draw(st.sampled_from([0.0, 0.0, 0.3, 0.95]))
    if minus_inf:
        logits = sprinkle(logits, g, -math.inf, minus_inf)
    logits = logits.to(dtype)
    ignore_index = draw(st.sampled_from([-100, -1, 0, V]))
    labels = torch.randint(0, V, tuple(lead), generator=g)
    ignored = torch.rand(tuple(lead), generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels = torch.where(ignored, torch.full_like(labels, ignore_index), labels)
    labels = labels.to(draw(st.sampled_from([torch.int64, torch.int32])))
    keep = (labels != ignore_index).unsqueeze(-1)
    logits = poison_where(logits, keep, draw(poisons))
    logits = strided_like(logits, draw(st.sampled_from(layouts)))
    return logits, labels, dict(temperature=draw(temperatures), ignore_index=ignore_index), g


def check_logits_grad(grad, expected, dtype, what):
    """A gradient w.r.t. logits: float32 by close() scaled to its largest entry, 16-bit by rounded_close()."""
    if dtype == torch.float32:
        close(grad, expected, what=what, elementwise=False)
    else:
        rounded_close(grad, expected, dtype, what=what)
