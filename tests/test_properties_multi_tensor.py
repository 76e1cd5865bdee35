"""Property-based checks (hypothesis) of the multi-tensor ops behind parameter averaging:
pack_tensors, unpack_tensors and gossip_mix agree with the reference bit for bit (the
documented contract) for any list of tensors (empty, 0-size, 0-dim, non-contiguous),
dtype pair, scale and mixing weights; bad input raises ValueError/TypeError naming the
argument.  Budgets: see tests/property_support.py."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, strategies as st  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import reference  # noqa: E402
from property_support import (  # noqa: E402
    LOSS_FLOATS, backends, bitwise_equal, budget, counted, fill, generator, interpreted, raises_naming, seeds,
)

scales = st.one_of(st.just(1.0), st.sampled_from([0.5, 0.25, 1 / 3, -2.0, 0.0]), st.floats(-1e3, 1e3))


@st.composite
def tensor_lists(draw, tiny: bool):
    dtype = draw(st.sampled_from(LOSS_FLOATS))
    g = generator(draw(seeds))
    shapes = draw(st.lists(st.lists(st.integers(0, 3 if tiny else 40), max_size=3), max_size=3 if tiny else 6))
    # The Triton interpreter (not Triton on a GPU) converts bfloat16 subnormals between
    # bfloat16 and float32 wrongly (a plain load(...).to(tl.float32) halves 1.56e-39):
    # no subnormals there.
    regime = draw(st.sampled_from(["normal", "wide", "huge"] + ([] if tiny else ["tiny"])))
    tensors = []
    for shape in shapes:
        t = fill(shape, g, regime, dtype)
        if len(shape) >= 2 and draw(st.booleans()):
            t = t.transpose(0, 1)  # non-contiguous
        tensors.append(t)
    return tensors, dtype


@backends
def test_pack_unpack_property(backend_device):
    backend, device = backend_device

    @budget(backend_device)
    @given(tensor_lists(interpreted(backend_device)), st.sampled_from((None,) + LOSS_FLOATS), scales, scales)
    @counted
    def check(case, bucket_dtype, scale, unscale):
        tensors, dtype = case
        tensors = [t.to(device) for t in tensors]
        total = sum(t.numel() for t in tensors)
        bucket = rlkernels.pack_tensors(tensors, dtype=bucket_dtype, scale=scale, backend=backend)
        assert bucket.shape == (total,) and bucket.dtype == (bucket_dtype or (dtype if tensors else torch.float32))
        expected = torch.empty(total, dtype=bucket.dtype)
        reference.pack_tensors([t.cpu() for t in tensors], expected, scale)
        assert bitwise_equal(bucket.cpu(), expected)
        targets = [torch.full_like(t, math.nan) for t in tensors]
        rlkernels.unpack_tensors(bucket, targets, scale=unscale, backend=backend)
        exp_targets = [torch.empty_like(t).cpu() for t in tensors]
        reference.unpack_tensors(bucket.cpu(), exp_targets, unscale)
        for t, e in zip(targets, exp_targets):
            assert bitwise_equal(t.cpu(), e)

    check()


@backends
def test_gossip_mix_property(backend_device):
    backend, device = backend_device
    tiny = interpreted(backend_device)

    @budget(backend_device)
    @given(st.lists(st.integers(0, 4 if tiny else 50), max_size=3), st.sampled_from(LOSS_FLOATS),
           st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), st.booleans(), st.booleans(),
           st.sampled_from(["normal", "wide", "huge"]), seeds)
    @counted
    def check(shape, dtype, split, inplace, strided_out, regime, seed):
        g = generator(seed)
        w_self = split[0]
        w_left = (1 - w_self) * split[1]
        weights = (w_self, w_left, 1 - w_self - w_left)
        x, left, right = (fill(shape, g, regime, dtype).to(device) for _ in range(3))
        expected = reference.gossip_mix(x.cpu(), left.cpu(), right.cpu(), *weights)
        if inplace:
            out = x.clone()
            result = rlkernels.gossip_mix(out, left, right, weights, out=out, backend=backend)
        elif strided_out and len(shape) >= 2:
            out = torch.empty(tuple(reversed(shape)), dtype=dtype, device=device).transpose(0, 1) \
                if len(shape) == 2 else torch.empty(shape, dtype=dtype, device=device)
            result = rlkernels.gossip_mix(x, left, right, weights, out=out, backend=backend)
        else:
            result = rlkernels.gossip_mix(x, left, right, weights, backend=backend)
        assert result.shape == x.shape and result.dtype == dtype
        assert bitwise_equal(result.cpu(), expected)

    check()


MULTI_BAD = ("not_list", "mixed_dtype", "int_tensor", "bucket_size", "bucket_2d", "bucket_strided", "scale_nan",
             "scale_inf", "scale_str", "dtype_int", "weights_sum", "weights_negative", "weights_len", "mix_shape",
             "mix_dtype")


@backends
def test_multi_tensor_bad_input(backend_device):
    backend, device = backend_device

    @budget(backend_device, examples=max(30, 2 * len(MULTI_BAD)))
    @given(st.sampled_from(MULTI_BAD), seeds)
    @counted
    def check(bad, seed):
        g = generator(seed)
        tensors = [fill((3, 2), g).to(device), fill((4,), g).to(device)]
        bucket = torch.zeros(10, device=device)
        x = fill((5,), g).to(device)
        if bad == "not_list":
            raises_naming(lambda: rlkernels.pack_tensors(tensors[0], backend=backend), "tensors")
        elif bad == "mixed_dtype":
            raises_naming(lambda: rlkernels.pack_tensors([tensors[0], tensors[1].double()], backend=backend),
                          "tensors")
        elif bad == "int_tensor":
            raises_naming(lambda: rlkernels.unpack_tensors(bucket, [tensors[0].long()], backend=backend), "tensors")
        elif bad == "bucket_size":
            raises_naming(lambda: rlkernels.unpack_tensors(bucket[:9], tensors, backend=backend), "bucket")
        elif bad == "bucket_2d":
            raises_naming(lambda: rlkernels.unpack_tensors(bucket.reshape(2, 5), tensors, backend=backend), "bucket")
        elif bad == "bucket_strided":
            wide = torch.zeros(20, device=device)
            raises_naming(lambda: rlkernels.pack_tensors(tensors, out=wide[::2], backend=backend), "bucket")
        elif bad in ("scale_nan", "scale_inf", "scale_str"):
            value = {"scale_nan": math.nan, "scale_inf": math.inf, "scale_str": "1"}[bad]
            raises_naming(lambda: rlkernels.pack_tensors(tensors, scale=value, backend=backend), "scale")
        elif bad == "dtype_int":
            raises_naming(lambda: rlkernels.pack_tensors(tensors, dtype=torch.int32, backend=backend), "dtype")
        elif bad in ("weights_sum", "weights_negative", "weights_len"):
            weights = {"weights_sum": (0.5, 0.5, 0.5), "weights_negative": (1.5, -0.25, -0.25),
                       "weights_len": (0.5, 0.5)}[bad]
            raises_naming(lambda: rlkernels.gossip_mix(x, x, x, weights, backend=backend), "weights")
        elif bad == "mix_shape":
            raises_naming(lambda: rlkernels.gossip_mix(x, x[:4], x, backend=backend), "left")
        elif bad == "mix_dtype":
            raises_naming(lambda: rlkernels.gossip_mix(x, x, x.double(), backend=backend), "right")

    check()
