"""The lm-head ops' matmul thread rule (csrc/lm_head/gemm.h): a CPU matmul gets a thread
per ~0.5 ms of work, through the calling thread's own OpenMP and MKL settings, put back
after the call; and a token's log-probs and gradients keep their bits whether its
batch's matmuls ran on one thread or on two."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

import rlkernels
from rlkernels._library import _C


def test_rule_gives_a_thread_per_half_millisecond_of_work():
    # float32: 5e7 flops a thread; 16-bit: 2e8 (the measured one-thread rates x 0.5 ms)
    assert _C.gemm_threads(16, 64, 16, False, 8) == 1
    assert _C.gemm_threads(64, 8192, 64, False, 2) == 1  # 6.7e7 flops
    assert _C.gemm_threads(128, 8192, 64, False, 2) == 2  # 1.3e8
    assert _C.gemm_threads(128, 8192, 64, False, 64) == 2
    assert _C.gemm_threads(128, 8192, 64, True, 64) == 1  # 16-bit: 4x the rate
    assert _C.gemm_threads(512, 8192, 64, True, 64) == 2
    assert _C.gemm_threads(4096, 8192, 4096, False, 64) == 64  # capped by the caller's threads
    assert _C.gemm_threads(4096, 8192, 4096, False, 1) == 1
    assert _C.gemm_threads(0, 8192, 64, False, 4) == 1  # an empty product: still one


def _knobs_expected() -> bool:
    return sys.platform.startswith("linux") and torch.backends.openmp.is_available()


def test_calling_threads_setting_is_lowered_for_the_call_and_put_back():
    probe = _C.gemm_threads_probe(64, 8192, 64, False)
    if probe is None:
        assert not _knobs_expected(), "torch's OpenMP runtime was not found from the extension"
        pytest.skip("torch without an OpenMP runtime: matmuls keep torch's threads")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert probe is not None and _C.gemm_threads_probe(64, 8192, 64, False) == (1, 2)
        assert _C.gemm_threads_probe(4096, 8192, 4096, False) == (2, 2)  # large: untouched
        assert torch.get_num_threads() == 2
        # another thread's setting is its own: lowering it inside a call there leaves ours
        seen = []
        worker = threading.Thread(target=lambda: seen.append(_C.gemm_threads_probe(64, 8192, 64, False)))
        worker.start()
        worker.join()
        assert seen and seen[0][0] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _tokens_from(hidden, weight, labels, dtype):
    """Log-probs and hidden gradients of the tokens; each token's incoming gradient is a
    function of its own label, so a token's rows do not depend on its batch."""
    hidden = hidden.to(dtype).requires_grad_(True)
    lp = rlkernels.linear_logprobs(hidden, weight.to(dtype), labels, backend="cpu")
    (grad,) = torch.autograd.grad(lp, hidden, grad_outputs=0.5 + (labels % 7).float() / 7)
    return lp.detach(), grad


@pytest.mark.parametrize("dtype, big", [(torch.float32, 256), (torch.bfloat16, 512)])
def test_a_tokens_bits_do_not_depend_on_its_batchs_matmul_threads(dtype, big):
    """16 tokens alone run every matmul on one thread; the same 16 tokens inside a batch of
    `big` run them on two (checked through the rule): their log-probs and hidden gradients
    must be the same bits."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if torch.get_num_threads() < 2:
            pytest.skip("needs two threads")
        H, V, small = 64, 8192, 16
        narrow = dtype != torch.float32
        assert _C.gemm_threads(small, V, H, narrow, 2) == 1
        assert _C.gemm_threads(big, V, H, narrow, 2) == 2
        g = torch.Generator().manual_seed(5)
        weight = torch.randn(V, H, generator=g) * 0.3
        hidden = torch.randn(1, big, H, generator=g)
        labels = torch.randint(0, V, (1, big), generator=g)
        lp_big, grad_big = _tokens_from(hidden, weight, labels, dtype)
        lp_small, grad_small = _tokens_from(hidden[:, :small], weight, labels[:, :small], dtype)
        assert torch.equal(lp_small, lp_big[:, :small])
        assert torch.equal(grad_small, grad_big[:, :small])
    finally:
        torch.set_num_threads(before)


def _mkl():
    """torch's MKL thread calls through ctypes, or None."""
    import ctypes
    import os

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        lib = ctypes.CDLL(os.path.join(lib_dir, "libtorch_cpu.so"), mode=getattr(os, "RTLD_NOLOAD", 0))
        return lib.MKL_Set_Num_Threads_Local, lib.MKL_Get_Max_Threads
    except (OSError, AttributeError):
        return None


def test_an_mkl_count_below_openmps_is_never_raised():
    """Where MKL's own thread count (set through MKL's API) is below OpenMP's, the rule
    takes the lower one as what the caller has: it leaves both counts alone rather than
    raise MKL's for the call."""
    mkl = _mkl()
    if mkl is None or _C.gemm_threads_probe(16, 16, 16, False) is None:
        pytest.skip("needs torch's MKL and OpenMP")
    set_local, get_max = mkl
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        previous = set_local(1)
        assert get_max() == 1
        m, n, k = 128, 8192, 64  # worth 2 threads (checked below)
        assert _C.gemm_threads(m, n, k, False, 4) == 2
        assert _C.gemm_threads_probe(m, n, k, False) == (4, 4)  # nothing lowered, nothing raised
        assert get_max() == 1
        set_local(previous)
    finally:
        torch.set_num_threads(before)


def test_the_python_scope_lowers_the_count_inside_and_puts_it_back():
    """ops/_chunked.py's matmuls (the vocabulary-parallel lm-head) run inside this scope."""
    if _C.gemm_threads_probe(16, 16, 16, False) is None:
        pytest.skip("torch without an OpenMP runtime")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = torch.empty(64, 64)
        with _C.GemmThreadsScope(a, 64, 8192, 64):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with _C.GemmThreadsScope(a, 4096, 8192, 4096):
            assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):  # put back on the way out of an error too
            with _C.GemmThreadsScope(a, 64, 8192, 64):
                1 / 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
