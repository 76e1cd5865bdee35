"""logprobs_vocab_tile, the per-tile kernel behind linear_logprobs' forward: tiles of
any width against the whole-row log-probs and entropy and against the float64
reference after every tile (including the arg-max flag), adversarial rows, opcheck,
torch.compile and bad input."""
from __future__ import annotations

import pytest
import torch

from rlkernels import reference
from rlkernels._library import BUILD_INFO
from support import TRITON_ON_CPU, assert_close, tie_logits


VOCAB_CHUNK = BUILD_INFO["vocab_chunk"]  # the chunk rule's width (core/logprobs.h)


def _tile_op(backend):
    return torch.ops.rlkernels.logprobs_vocab_tile_triton if backend == "triton" else torch.ops.rlkernels.logprobs_vocab_tile


def _run_tiles(op, logits, labels, width, temperature=1.0, entropy=True, ignore_index=-100):
    """Streams logits through the tile op in column blocks of `width`; returns the state."""
    N, V = logits.shape
    state = torch.full((N, 4), float("nan"), device=logits.device)  # never read before the first tile writes it
    for v0 in range(0, V, width):
        v1 = min(v0 + width, V)
        op(logits[:, v0:v1], labels, state, temperature, ignore_index, v0, entropy, v1 == V)
    return state


def _adversarial_logits(N, V, dtype, device):
    x = torch.randn(N, V, device=device) * 4
    x[1] *= 2500                      # huge logits (+-1e4)
    x[2] = -float("inf")              # -inf everywhere but the label
    x[3, : V // 2] = -float("inf")    # a -inf prefix: the first tiles see nothing finite
    x[4] = x[4] - 1e4                 # a large common offset
    labels = torch.randint(0, V, (N,), device=device)
    labels[2] = V - 1
    x[2, V - 1] = 3.0
    labels[3] = V - 2
    labels[5] = -100                  # ignored
    return x.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,width", [(101, 7), (101, 101), (300, 64), (5000, 2048), (6000, 4096), (20000, 8192)])
def test_vocab_tiles_match_whole_row(backend_device, dtype, V, width):
    """Tiles merged in order give the whole-row log-probs, entropy and row statistics:
    against the float64 reference always, and bit for bit with the CPU whole-row kernel
    when tiles start on its vocabulary chunks' edges (linear_logprobs' tiles)."""
    backend, device = backend_device
    logits, labels = _adversarial_logits(9, V, dtype, device)
    state = _run_tiles(_tile_op(backend), logits, labels, width, temperature=0.7)
    lp_true, ent_true = reference.logprobs(logits.double(), labels, temperature=0.7, entropy=True)
    assert_close(state[:, 0], lp_true, dtype=torch.float32, msg="logprobs")
    assert_close(state[:, 1], ent_true, dtype=torch.float32, msg="entropy")
    whole = torch.ops.rlkernels.logprobs_triton if backend == "triton" else torch.ops.rlkernels.logprobs
    lp, ent, saved = whole(logits, labels, 0.7, -100, True, False)
    assert torch.equal(state[5], torch.zeros(4, device=device))  # ignored row
    if backend == "cpu" and (width % VOCAB_CHUNK == 0 or width >= V):
        assert torch.equal(state[:, 0], lp) and torch.equal(state[:, 1], ent) and torch.equal(state[:, 2:], saved)
    else:
        assert torch.equal(state[:, 2], saved[:, 0])  # the maximum is exact whatever the tiling
        assert_close(state[:, 3], saved[:, 1], dtype=torch.float32, msg="log-sum-exp")


def test_vocab_tiles_without_entropy(backend_device):
    backend, device = backend_device
    logits, labels = _adversarial_logits(7, 333, torch.float32, device)
    state = _run_tiles(_tile_op(backend), logits, labels, 100, entropy=False)
    assert_close(state[:, 0], reference.logprobs(logits.double(), labels), dtype=torch.float32)
    assert torch.equal(state[:, 1], torch.zeros(7, device=device))


def test_vocab_tile_opcheck_and_bad_input():
    logits, labels = _adversarial_logits(6, 50, torch.float32, "cpu")
    logits = logits.nan_to_num(neginf=-30.0)
    state = torch.zeros(6, 4)
    ops = [torch.ops.rlkernels.logprobs_vocab_tile] + ([torch.ops.rlkernels.logprobs_vocab_tile_triton]
                                                      if TRITON_ON_CPU else [])
    for op in ops:
        torch.library.opcheck(op.default, (logits[:, :20], labels, state.clone(), 0.9, -100, 0, True, False))
        first = state.clone()
        op(logits[:, :20], labels, first, 0.9, -100, 0, True, False)
        torch.library.opcheck(op.default, (logits[:, 20:], labels, first, 0.9, -100, 20, True, True))
        with pytest.raises((RuntimeError, ValueError), match="state"):
            op(logits, labels, torch.zeros(6, 3), 1.0, -100, 0, True, True)
        with pytest.raises((RuntimeError, ValueError), match="vocab_start"):
            op(logits, labels, state, 1.0, -100, -1, True, True)
        with pytest.raises((RuntimeError, ValueError), match="labels"):
            op(logits, labels[:5], state, 1.0, -100, 0, True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [True, False])
def test_vocab_tile_each_step_matches_reference(backend_device, dtype, entropy):
    """Every tile's state (running statistics, then the outputs) against the float64
    reference of one step, from the state the op itself left."""
    backend, device = backend_device
    logits, labels = _adversarial_logits(9, 333, dtype, device)
    op = _tile_op(backend)
    state = torch.full((9, 4), float("nan"), device=device)
    for v0 in range(0, 333, 100):
        v1 = min(v0 + 100, 333)
        tile, finish = logits[:, v0:v1], v1 == 333
        expected = reference.logprobs_vocab_tile(tile, labels, state, temperature=0.7, vocab_start=v0,
                                                 entropy=entropy, finish=finish)
        op(tile, labels, state, 0.7, -100, v0, entropy, finish)
        maximum = 2 if finish else 0
        assert torch.equal(state[:, maximum], expected[:, maximum].float()), f"max after tile at {v0}"
        others = [k for k in range(4) if k != maximum]
        assert_close(state[:, others], expected[:, others], dtype=torch.float32, msg=f"state after tile at {v0}")


def test_vocab_tile_under_torch_compile():
    logits, labels = _adversarial_logits(6, 300, torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="eager")
    def two_tiles(x, y):
        state = torch.empty(6, 4)
        torch.ops.rlkernels.logprobs_vocab_tile(x[:, :128], y, state, 1.0, -100, 0, True, False)
        torch.ops.rlkernels.logprobs_vocab_tile(x[:, 128:], y, state, 1.0, -100, 128, True, True)
        return state

    state = two_tiles(logits, labels)
    assert_close(state[:, 0], reference.logprobs(logits.double(), labels), dtype=torch.float32)


def _run_tiles_top1(op, logits, labels, width, temperature=1.0):
    N, V = logits.shape
    state = torch.full((N, 5), float("nan"), device=logits.device)
    for v0 in range(0, V, width):
        v1 = min(v0 + width, V)
        expected = reference.logprobs_vocab_tile(logits[:, v0:v1], labels, state, temperature=temperature,
                                                 vocab_start=v0, finish=v1 == V)
        op(logits[:, v0:v1], labels, state, temperature, -100, v0, True, v1 == V)
        assert torch.equal(state[:, 4], expected[:, 4].float()), f"arg-max flag after the tile at {v0}"
        assert_close(state[:, :4], expected[:, :4], dtype=torch.float32, msg=f"state after the tile at {v0}")
    return state


@pytest.mark.parametrize("width", [1, 7, 16, 96])
def test_vocab_tile_top1_each_step_matches_reference(backend_device, width):
    """The fifth state value (the arg-max flag) after every tile, against the float64
    reference of one step, on tie-laden rows and rows with -inf prefixes and huge logits."""
    backend, device = backend_device
    logits, labels = tie_logits(96, device)
    adversarial, adversarial_labels = _adversarial_logits(9, 96, torch.float32, device)
    logits = torch.cat([logits, adversarial])
    labels = torch.cat([labels, adversarial_labels])
    state = _run_tiles_top1(_tile_op(backend), logits, labels, width, temperature=0.7)
    top1 = (logits.double().argmax(-1) == labels) & (labels != -100)  # the first maximum wins
    assert torch.equal(state[:, 4] != 0, top1)


def test_vocab_tile_top1_opcheck():
    logits, labels = tie_logits(50, "cpu")
    ops = [torch.ops.rlkernels.logprobs_vocab_tile] + ([torch.ops.rlkernels.logprobs_vocab_tile_triton]
                                                      if TRITON_ON_CPU else [])
    for op in ops:
        state = torch.zeros(16, 5)
        torch.library.opcheck(op.default, (logits[:, :20], labels, state.clone(), 0.9, -100, 0, True, False))
        op(logits[:, :20], labels, state, 0.9, -100, 0, True, False)
        torch.library.opcheck(op.default, (logits[:, 20:], labels, state, 0.9, -100, 20, True, True))


# ---- the chunk-state mode (CPU): one state per vocabulary chunk, folded with finish ---------------

def test_vocab_tile_chunk_state_opcheck_and_bad_input():
    """A [N, C, 4] state: tiles on chunk edges fill their chunks' slots, finish folds them
    (bitwise against the whole row: tests/test_vocab_parallel_exact.py)."""
    op = torch.ops.rlkernels.logprobs_vocab_tile
    V = VOCAB_CHUNK + 50
    logits, labels = _adversarial_logits(6, V, torch.float32, "cpu")
    state = torch.zeros(6, 2, 4)
    torch.library.opcheck(op.default, (logits[:, VOCAB_CHUNK:], labels, state.clone(), 0.9, -100, VOCAB_CHUNK, True,
                                       False))
    op(logits[:, :VOCAB_CHUNK], labels, state, 0.9, -100, 0, True, False)
    op(logits[:, VOCAB_CHUNK:], labels, state, 0.9, -100, VOCAB_CHUNK, True, False)
    torch.library.opcheck(op.default, (logits[:, :0], labels, state, 0.9, -100, V, True, True))
    op(logits[:, :0], labels, state, 0.9, -100, V, True, True)
    lp, ent, saved = torch.ops.rlkernels.logprobs(logits, labels, 0.9, -100, True, False)
    assert torch.equal(state[:, 0, 0], lp) and torch.equal(state[:, 0, 1], ent)
    assert torch.equal(state[:, 0, 2:], saved)
    assert torch.equal(state[5, 0], torch.zeros(4))  # ignored row
    with pytest.raises(RuntimeError, match=f"vocab_start must be a multiple of the vocabulary chunk \\({VOCAB_CHUNK}"):
        op(logits[:, 10:20], labels, torch.zeros(6, 2, 4), 1.0, -100, 10, True, False)
    with pytest.raises(RuntimeError, match="reaches past the state's 1 chunks"):
        op(logits, labels, torch.zeros(6, 1, 4), 1.0, -100, 0, True, False)
    with pytest.raises(RuntimeError, match="with finish, the row ends at"):
        op(logits[:, :0], labels, torch.zeros(6, 3, 4), 1.0, -100, V, True, True)
    past = labels.clone()
    past[0] = V  # in the last chunk's columns but past the row's end
    with pytest.raises(RuntimeError, match=f"label {V} at flat index 0 is outside"):
        op(logits[:, :0], past, torch.zeros(6, 2, 4), 1.0, -100, V, True, True)
