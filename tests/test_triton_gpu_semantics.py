"""Where compiled Triton on a GPU and the interpreter part ways.

- NaN survives every 16-bit store: the GPU's canonical NaN is 0x7FFFFFFF (and
  0xFFFFFFFF with the sign set); a hand-rolled round-to-nearest-even add turns those
  into -0.0 / +0.0.  Checked in the interpreter with those bit patterns, and in the PTX
  the compiler really emits for a GPU (no GPU needed: Triton's bundled ptxas).
- Every Triton op launches on its inputs' device (needs two GPUs to run).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

import rlkernels
from support import TRITON_ON_CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN_BITS = (0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001)

needs_triton_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def nan_with_bits(*bits: int) -> torch.Tensor:
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def test_nan_bit_patterns_are_nan():
    values = nan_with_bits(*NAN_BITS)
    assert torch.isnan(values).all()


@needs_triton_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_logprobs_backward_keeps_nan_in_16bit_gradients(dtype):
    N, V = len(NAN_BITS) + 1, 37
    logits = torch.randn(N, V).to(dtype)
    labels = torch.randint(0, V, (N,))
    _, _, saved = torch.ops.rlkernels.logprobs_triton(logits, labels, 1.0, -100, False, False)
    grad = torch.cat([nan_with_bits(*NAN_BITS), torch.ones(1)])
    out = torch.ops.rlkernels.logprobs_backward_triton(grad, None, logits, labels, saved, torch.empty(0), 1.0, -100)
    assert out.dtype == dtype
    assert torch.isnan(out[:-1]).all(), f"NaN gradients lost: {out[:-1]}"
    assert torch.isfinite(out[-1]).all()
    # the in-place variant stores through the same conversion
    inplace = logits.clone()
    torch.ops.rlkernels.logprobs_backward_inplace_triton(grad, None, inplace, labels, saved, torch.empty(0), 1.0, -100)
    assert torch.isnan(inplace[:-1]).all()
    torch.testing.assert_close(inplace[-1], out[-1], rtol=0, atol=0)


@needs_triton_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kl_backward_keeps_nan_in_16bit_gradients(dtype):
    N, V = len(NAN_BITS), 19
    a, b = torch.randn(N, V).to(dtype), torch.randn(N, V).to(dtype)
    _, saved = torch.ops.rlkernels.kl_from_logits_triton(a, b, None, 1.0)
    ga, gb = torch.ops.rlkernels.kl_from_logits_backward_triton(nan_with_bits(*NAN_BITS), a, b, None, saved, 1.0,
                                                                 True, True)
    assert torch.isnan(ga).all() and torch.isnan(gb).all()


@needs_triton_cpu
def test_bf16_rounding_by_hand_is_round_to_nearest_even():
    """The interpreter path rounds as a GPU would (ties to even), NaN and inf kept."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x00000001,
                         *NAN_BITS], dtype=torch.int64)
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    zeros = torch.zeros_like(x)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    torch.ops.rlkernels.gossip_mix_triton(x, zeros, zeros, 1.0, 0.0, 0.0, out)
    expected = x.to(torch.bfloat16)  # PyTorch rounds to nearest even
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out[-len(NAN_BITS):]).all()


def test_compiled_bf16_store_is_a_rounding_conversion(tmp_path):
    """On a GPU the bfloat16 gradient comes from cvt.rn.bf16.f32 (round to nearest even,
    NaN kept), not from integer arithmetic on the float's bits."""
    pytest.importorskip("triton")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, ".ci", "triton_aot.py"), "--quick", "--quiet", "--targets", "90",
         "--ops", "logprobs_backward_triton", "--ptx-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={k: v for k, v in os.environ.items()
                                                          if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bf16 = glob.glob(str(tmp_path / "logprobs._logprobs_bwd_kernel-sm_90-bf16-*.ptx"))
    assert bf16, os.listdir(tmp_path)
    for path in bf16:
        ptx = open(path).read()
        assert "cvt.rn.bf16.f32" in ptx or "cvt.rn.bf16x2.f32" in ptx, path
        assert "32767" not in ptx and "0x7FFF;" not in ptx.upper(), f"integer rounding left in {path}"


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@two_gpus
@pytest.mark.skipif(not rlkernels.HAS_TRITON, reason="triton not importable")
def test_triton_ops_launch_on_their_inputs_device():
    """Inputs on cuda:1 while cuda:0 is current: results equal the same op on cuda:0."""
    torch.manual_seed(0)
    logits = torch.randn(5, 301)
    labels = torch.randint(0, 301, (5,))
    rewards, values = torch.randn(3, 17), torch.randn(3, 17)
    with torch.cuda.device(0):
        expected = rlkernels.logprobs(logits.cuda(0), labels.cuda(0), entropy=True, backend="triton")
        expected_gae = rlkernels.gae(rewards.cuda(0), values.cuda(0), gamma=0.9, lam=0.8, backend="triton")
        got = rlkernels.logprobs(logits.cuda(1), labels.cuda(1), entropy=True, backend="triton")
        got_gae = rlkernels.gae(rewards.cuda(1), values.cuda(1), gamma=0.9, lam=0.8, backend="triton")
        torch.cuda.synchronize(1)
    for e, g in zip(list(expected) + list(expected_gae), list(got) + list(got_gae)):
        assert g.device == torch.device("cuda", 1)
        torch.testing.assert_close(g.cpu(), e.cpu(), rtol=0, atol=0)


def test_rows_of_odd_length_get_vector_loads(tmp_path):
    """V = 50257 and 4097 (odd): the backwards' inner tiles, aligned to 16 bytes of
    memory, load and store 128-bit vectors (ld/st.global.v4) in the PTX compiled for a
    GPU, not scalars (docs/gpu-kernels.md).  (The forwards' reductions keep blocks of
    columns, so that a row's bits do not depend on its address.)"""
    pytest.importorskip("triton")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, ".ci", "triton_aot.py"), "--quick", "--quiet", "--targets", "90",
         "--ops", "logprobs_backward_triton", "kl_from_logits_backward_triton", "--ptx-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={k: v for k, v in os.environ.items()
                                                          if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checked = 0
    for kernel in ("logprobs._logprobs_bwd_kernel", "kl_from_logits._kl_bwd_kernel"):
        for path in glob.glob(str(tmp_path / f"{kernel}-sm_90-*.ptx")):
            ptx = open(path).read()
            case = ptx.splitlines()[0]
            # a slice of a larger tensor is laid out apart from its dense gradient: one side is unaligned
            if "[:, :-1]" in case or ("V=50257" not in case and "V=4097" not in case):
                continue
            assert "ld.global.v4.b32" in ptx, f"no 128-bit load in {path}"
            assert "st.global.v4.b32" in ptx, f"no 128-bit store in {path}"
            checked += 1
    assert checked >= 4, os.listdir(tmp_path)
