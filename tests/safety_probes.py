"""Direct calls of every registered rlkernels op with broken companions.

Each op in the registry has one valid sample call below (small shapes).  From it the
probes are derived from the op's schema: every tensor argument is in turn cut short
in its first or last dimension, replaced by an empty tensor, given another dtype or
made non-contiguous; integer tensors are filled with out-of-range ids; integer
arguments get -1 and a huge value.  Run as a script (`python tests/safety_probes.py
OP...`) it prints one JSON line per probe, so that a probe which kills the process
(a segfault) leaves the name of the probe that did it; tests/test_safety.py runs it
in a child process and judges the outcomes:

- "short", "empty" and "dtype" probes of an argument the sample ties to another one
  must raise (anything else read or wrote memory the tensor does not have);
- "range" probes (ids outside what the op can index) raise, or flag the result with NaN;
- "strided" probes (the same values in a strided tensor) raise or give the sample's result;
- every other probe may raise or return, but never ends the process.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

if __name__ == "__main__":  # tests/support.py, which sets this for pytest, is not imported here
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

import rlkernels  # noqa: F401  (registers the ops)

B, T, V = 3, 5, 7


@dataclass
class Sample:
    args: list
    # tensor arguments whose shape alone defines the problem: cutting them short is a
    # different valid call, not a broken one
    free: tuple = ()
    # integer tensor arguments holding ids, with the out-of-range values the op must
    # flag (raise or NaN); other huge or negative ids it must only survive
    ids: dict = field(default_factory=dict)
    # matmul operands: their layout may change torch's rounding, so a strided copy need
    # not give the same bits
    matmul: tuple = ()


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _mask(*shape):
    m = torch.rand(*shape) > 0.3
    m.view(-1)[0] = True
    return m


def _samples() -> dict[str, Sample]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    logits = _randn(B, V)
    labels = torch.randint(0, V, (B,), generator=g)
    saved2 = torch.randn(B, 2)
    entropy = torch.rand(B)
    backward = [torch.randn(B), torch.randn(B), logits, labels, saved2, entropy, 1.0, -100, 0]
    tokens = [_randn(B, T) for _ in range(4)]
    policy_coef = [0.2, 0.2, math.inf, 20.0, 0.1, -1.0, -1.0, -1.0]
    out_of_vocab = (V, -5, 10**8, 2**62)
    out = {
        "gae": Sample([tokens[0], tokens[1], _mask(B, T), _mask(B, T) & False, torch.randn(B), 0.99, 0.95],
                      free=("rewards",)),
        "discounted_returns": Sample([tokens[0], _mask(B, T), _mask(B, T) & False, 0.99], free=("rewards",)),
        "group_advantages": Sample([torch.randn(6), torch.tensor([0, 1, 1, 0, 2, 2]), 0, 3, 0, 0, 1e-6],
                                   free=("scores",), ids={"group_index": (3, -5, 10**8, 2**62)}),
        "masked_row_mean": Sample([tokens[0], _mask(B, T)], free=("x",)),
        "masked_whiten": Sample([tokens[0], _mask(B, T), True, 1e-8], free=("x",)),
        "policy_loss": Sample([tokens[0], tokens[1], tokens[2], _mask(B, T), torch.rand(B, T), tokens[3],
                               policy_coef, "k3", "token-mean", True], free=("logprobs",)),
        "value_loss": Sample([tokens[0], tokens[1], tokens[2], _mask(B, T), [0.2, -1.0, -1.0, -1.0], "token-mean",
                              True], free=("values",)),
        "scale_rows": Sample([tokens[0], torch.randn(B), torch.tensor(1.0), torch.float32], free=("grad",)),
        "dpo_loss": Sample([torch.randn(B), torch.randn(B), torch.randn(B), torch.randn(B), 0.1, "sigmoid", 0.0],
                           free=("policy_chosen",)),
        "sequence_logprobs": Sample([tokens[0], _mask(B, T), True], free=("token_logprobs",)),
        "dpo_sequence_loss": Sample([_randn(2 * B, T), _randn(2 * B, T), _mask(2 * B, T), 0.1, "sigmoid", 0.1, True],
                                    free=("policy_logprobs",)),
        "dpo_sequence_loss_backward": Sample([torch.randn(B), _mask(2 * B, T), torch.randn(2 * B), -1.0, T,
                                              torch.float32], free=("grad_losses",)),
        "sequence_logprobs_backward": Sample([torch.randn(B), _mask(B, T), torch.full((B,), 2.0), True, T,
                                              torch.float32], free=("grad",)),
        "logprobs": Sample([logits, labels, 1.0, -100, True, False], free=("logits",), ids={"labels": out_of_vocab}),
        # a backward sees one tile of the vocabulary: only a negative label is surely wrong
        "logprobs_backward": Sample(backward, free=("logits",), ids={"labels": (-5,)}),
        "logprobs_backward_inplace": Sample(backward, free=("logits",), ids={"labels": (-5,)}),
        "logprobs_vocab_tile": Sample([logits, labels, torch.zeros(B, 4), 1.0, -100, 0, True, True],
                                      free=("logits",), ids={"labels": out_of_vocab}),
        "kl_from_logits": Sample([logits, _randn(B, V), _mask(B), 1.0], free=("logits",)),
        "kl_from_logits_backward": Sample([torch.randn(B), logits, _randn(B, V), _mask(B), torch.randn(B, 5), 1.0,
                                           True, True], free=("logits",)),
        "kl_vocab_tile": Sample([logits, _randn(B, V), torch.zeros(B, 1, 6), 1.0, 0, True], free=("logits",)),
        "kl_penalty": Sample([tokens[0], tokens[1], "k3", 10.0], free=("logprobs",)),
        "pack_tensors": Sample([[torch.randn(2, 3), torch.randn(4)], torch.empty(10), 0.5]),
        "unpack_tensors": Sample([torch.randn(10), [torch.empty(2, 3), torch.empty(4)], 0.5]),
        "gossip_mix": Sample([torch.randn(6), torch.randn(6), torch.randn(6), 0.5, 0.25, 0.25, torch.empty(6)],
                             free=("x",)),
    }
    hidden, weight = _randn(B * T, 4), _randn(V, 4)
    token_labels = torch.randint(0, V, (B * T,), generator=g)
    for backend in _linear_backends():
        out[f"linear_logprobs/{backend}"] = Sample(
            [hidden, weight, token_labels, torch.randn(V), 1.0, -100, True, True, 4, 4, 1024, True, backend],
            free=("hidden", "weight"), ids={"labels": out_of_vocab}, matmul=("hidden", "weight"))
        out[f"linear_logprobs_backward/{backend}"] = Sample(
            [torch.randn(B * T), torch.randn(B * T), hidden, weight, token_labels, torch.randn(V),
             torch.randn(B * T, 2), torch.rand(B * T), 1.0, -100, 4, 4, 1024, True, backend, True, True, True],
            free=("hidden", "weight"), ids={"labels": (-5,)}, matmul=("hidden", "weight"))
        out[f"linear_policy_loss/{backend}"] = Sample(
            [hidden.reshape(B, T, 4), weight, token_labels.reshape(B, T), torch.randn(V), tokens[0], tokens[1],
             _mask(B, T), torch.rand(B, T), tokens[2], policy_coef, "k3", "token-mean", 0.01, 1.0, -100, 4,
             backend, [True, True, True], "counted"],
            free=("hidden", "weight"), ids={"labels": out_of_vocab}, matmul=("hidden", "weight"))
    return out


def _linear_backends() -> list[str]:
    """The kernels the composite linear ops run on CPU tensors."""
    out = ["cpu"]
    if rlkernels._library.triton_status()[0] and rlkernels._library.triton_interpreting():
        out.append("triton")
    return out


def registered_ops() -> list[str]:
    """Every rlkernels op the dispatcher knows, the Triton twins included when Triton
    imports (rlkernels.triton registers them)."""
    try:
        import rlkernels.triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        pass
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("rlkernels::")]
    return sorted(set(n.split(".")[0] for n in names))


def samples_for(op: str) -> dict[str, Sample]:
    """The sample calls of `op` (a Triton twin shares its op's), by name."""
    base = op[: -len("_triton")] if op.endswith("_triton") else op
    return {name: s for name, s in _samples().items() if name.split("/")[0] == base}


def _schema(op: str):
    return getattr(torch.ops.rlkernels, op).default._schema


def _is_tensor_list(arg) -> bool:
    return isinstance(arg, list) and bool(arg) and isinstance(arg[0], torch.Tensor)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if _is_tensor_list(value):
        return [t.clone() for t in value]
    return value


def _other_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if (t.dtype == torch.bool or not t.is_floating_point()) else torch.int64


def probes(op: str):
    """(case name, must: "raise" | "flag" | "survive", args) for each probe of `op`."""
    for label, sample in samples_for(op).items():
        for case, must, args in _probes(op, sample):
            yield f"{label}:{case}", must, args


def _probes(op: str, sample: Sample):
    schema = _schema(op)
    names = [a.name for a in schema.arguments]
    yield "sample", "survive", [_clone(a) for a in sample.args]
    for i, (name, value) in enumerate(zip(names, sample.args)):
        def with_arg(new, i=i):
            args = [_clone(a) for a in sample.args]
            args[i] = new
            return args

        tied = "survive" if name in sample.free else "raise"
        if isinstance(value, torch.Tensor):
            if value.dim() >= 1 and value.shape[0] >= 1:
                yield f"{name}:short-first", tied, with_arg(value[:-1].clone())
            if value.dim() >= 2 and value.shape[-1] >= 1:
                yield f"{name}:short-last", tied, with_arg(value[..., :-1].clone())
            if value.dim() >= 1 and value.numel() > 0:
                yield f"{name}:empty", tied, with_arg(value.new_empty((0,)))
                yield f"{name}:dtype", tied, with_arg(value.to(_other_dtype(value)))
            if value.dim() >= 2 and value.shape[-1] >= 2:
                wide = torch.stack([value, value], dim=-1).flatten(-2)[..., ::2]  # same values, stride 2
                yield f"{name}:strided", "survive" if name in sample.matmul else "same", with_arg(wide)
            if value.dim() >= 1:
                yield f"{name}:unsqueezed", tied, with_arg(value.unsqueeze(0).expand(2, *value.shape))
            if name in sample.ids:
                for bad in sorted({-5, 10**8, 2**62, *sample.ids[name]}):
                    ids = value.clone()
                    ids.view(-1)[0] = bad
                    yield f"{name}:id={bad}", "flag" if bad in sample.ids[name] else "survive", with_arg(ids)
        elif _is_tensor_list(value):
            yield f"{name}:one-less", "raise", with_arg([t.clone() for t in value[:-1]])
            yield f"{name}:short-item", "raise", with_arg([value[0].clone(), value[1].flatten()[:-1].clone()])
            yield f"{name}:dtype-item", "raise", with_arg([value[0].clone(), value[1].double()])
        elif isinstance(value, int) and not isinstance(value, bool):
            for bad in (-1, 10**12):
                yield f"{name}={bad}", "survive", with_arg(bad)
        elif isinstance(value, float):
            for bad in (math.nan, math.inf, 0.0):
                yield f"{name}={bad}", "survive", with_arg(bad)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            yield f"{name}:one-less", "raise", with_arg(value[:-1])


def _outputs(result, args, schema) -> list[torch.Tensor]:
    """The op's returned tensors and the arguments it writes."""
    out = []
    for item in result if isinstance(result, (tuple, list)) else [result]:
        if isinstance(item, torch.Tensor):
            out.append(item)
    for arg, value in zip(schema.arguments, args):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.extend(value if isinstance(value, list) else [value])
    return out


def _same(outputs: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return len(outputs) == len(expected) and all(
        a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())
        if a.is_floating_point() else torch.equal(a, b) for a, b in zip(outputs, expected))


def run(op: str) -> None:
    schema = _schema(op)
    fn = getattr(torch.ops.rlkernels, op)
    expected = None
    for case, must, args in probes(op):
        print(json.dumps({"op": op, "case": case, "must": must, "start": True}), flush=True)
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - every error counts as "raised"
            outcome, detail = "raised", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            outputs = _outputs(result, args, schema)
            if case.endswith(":sample"):
                expected = outputs
            nan = any(bool(t.isnan().any()) for t in outputs if t.is_floating_point())
            outcome, detail = ("nan" if nan else "returned"), ""
            if must == "same" and not _same(outputs, expected):
                outcome, detail = "differs", "the result differs from the contiguous sample's"
        print(json.dumps({"op": op, "case": case, "must": must, "outcome": outcome, "detail": detail}), flush=True)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        run(name)
